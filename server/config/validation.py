"""How settings are checked and how a problem is worded: the value types every section uses,
the `section` decorator, and the translation of pydantic's errors into batchline's messages.

Every message names the dotted key first (`models.churn.max_batch_size: expected an integer
>= 1, got 0`); a value that could not even be read as its type names where its text came from
instead, when that was an environment variable or a flag (`BATCHLINE_GRPC_PORT: expected an
integer, got 'nine'`). An unknown key reads `unknown key server.port (known: ...)`.

The scalar types are strict about Python types (a TOML `true` is no number, `1` is no boolean)
and read text the way an environment variable or a flag carries it: decimal text for an
integer, a number's text for a float, true/false/1/0 for a boolean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from server.errors import ConfigError

# Every section: unknown keys refused, values immutable once checked.
SECTION = ConfigDict(extra="forbid", validate_default=False)

Loc = tuple[str | int, ...]

# -- value types -------------------------------------------------------------------------------


def _int_text(value: Any) -> Any:
    if isinstance(value, str) and value.strip().removeprefix("-").isdecimal():
        return int(value)
    return value


def _float_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _bool_text(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    return value


def _not_nan(value: float) -> float:
    # inf is allowed where a bound allows it (the gate's max_mean_abs_diff = inf turns the
    # score check off); NaN never is: every comparison with it is false, so it passes any check.
    if math.isnan(value):
        raise invalid(f"expected a number, got {value!r}")
    return value


Int = Annotated[int, Strict(), BeforeValidator(_int_text)]
Float = Annotated[float, Strict(), BeforeValidator(_float_text), AfterValidator(_not_nan)]
Bool = Annotated[bool, Strict(), BeforeValidator(_bool_text)]
Str = Annotated[str, Strict()]


def invalid(message: str) -> PydanticCustomError:
    """A value's problem, worded for the settings (the key is added where it is reported)."""
    return PydanticCustomError("batchline_value", "{message}", {"message": message})


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def between(low: float, high: float, *, open_low: bool = False, what: str = "") -> Any:
    """A validator for `low..high` (`(low, high]` with open_low), worded as today's messages."""
    shown = what or (
        f"({_number(low)}, {_number(high)}]" if open_low else f"{_number(low)}..{_number(high)}"
    )

    def check(value: float) -> float:
        if (value <= low if open_low else value < low) or value > high:
            raise invalid(f"expected {shown}, got {value!r}")
        return value

    return AfterValidator(check)


Port = Annotated[
    int, Strict(), BeforeValidator(_int_text), between(0, 65535, what="a port 0..65535")
]
# A port that -1 turns off.
OptionalPort = Annotated[
    int, Strict(), BeforeValidator(_int_text), between(-1, 65535, what="a port -1..65535")
]


class Problems:
    """Cross-field checks of one section, reported together (each `KEY: text`, relative to
    the section; `{at}` in a key or text stands for the section's own dotted prefix)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, text: str) -> None:
        self.lines.append(f"{key}: {text}")

    def check(self) -> None:
        if self.lines:
            raise PydanticCustomError(
                "batchline_checks", "{message}", {"message": "\n".join(self.lines)}
            )


# -- sections ----------------------------------------------------------------------------------

T = TypeVar("T")


def section(prefix: str = "") -> Callable[[type[T]], type[T]]:
    """Make a pydantic dataclass's constructor raise ConfigError (a ValueError) worded as the
    settings word it, each key prefixed with `prefix` (`tracing.sampling_ratio: ...`).

    Inside load_settings a section is validated as part of the whole document (every error
    collected, keys named from the top); this covers constructing one directly, and
    dataclasses.replace, which constructs again."""

    def wrap(cls: type[T]) -> type[T]:
        init = cls.__init__
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raw = {**dict(zip(names, args, strict=False)), **kwargs}
                at: Loc = tuple(prefix.split(".")) if prefix else ()
                raise ConfigError.of(messages(exc.errors(), root=cls, raw=raw, at=at)) from None

        setattr(cls, "__init__", __init__)  # noqa: B010 - mypy refuses assigning a method
        setattr(cls, "_prefix", prefix)  # noqa: B010
        return cls

    return wrap


def from_mapping(cls: type[T], prefix: str, mapping: Mapping[str, Any]) -> T:
    """Build section `cls` from a table; the ConfigError names `prefix.key`."""
    validator = getattr(cls, "__pydantic_validator__")  # noqa: B009
    try:
        return typing.cast(T, validator.validate_python(dict(mapping)))
    except ValidationError as exc:
        at: Loc = tuple(prefix.split(".")) if prefix else ()
        raise ConfigError.of(messages(exc.errors(), root=cls, raw=mapping, at=at)) from None


# -- wording -----------------------------------------------------------------------------------

_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
}
_PLURAL: dict[Any, str] = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
# Errors about reading a value as its type: reported at the variable or flag the text came from.
_READING = {
    "int_type",
    "int_parsing",
    "int_from_float",
    "float_type",
    "float_parsing",
    "bool_type",
    "bool_parsing",
    "string_type",
    "tuple_type",
    "list_type",
    "dict_type",
    "dataclass_type",
    "dataclass_exact_type",
    "model_type",
    "model_attributes_type",
}
_UNKNOWN = {"extra_forbidden", "unexpected_keyword_argument"}


def dotted(loc: Iterable[str | int]) -> str:
    return ".".join(str(part) for part in loc)


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _fields(tp: Any) -> dict[str, Any]:
    """The fields of a section (pydantic dataclass) or of the document (a pydantic model)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {name: f.annotation for name, f in tp.model_fields.items()}
    found = getattr(tp, "__pydantic_fields__", None)
    if found is not None:
        hidden = getattr(tp, "NOT_KEYS", ())
        return {name: f.annotation for name, f in found.items() if name not in hidden}
    return {}


def _annotation_at(root: Any, loc: Sequence[str | int]) -> Any:
    """The declared type at `loc` below `root`; None where the path leaves the schema."""
    tp = root
    for part in loc:
        tp = _strip(tp)
        origin = get_origin(tp)
        if origin in (dict, Mapping):
            tp = get_args(tp)[-1]
        elif origin in (tuple, list):
            tp = get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            tp = next((a for a in get_args(tp) if a is not type(None)), None)
            if tp is None:
                return None
            tp = _fields(_strip(tp)).get(str(part))
        else:
            tp = _fields(tp).get(str(part))
        if tp is None:
            return None
    return _strip(tp)


def _lookup(raw: Any, loc: Sequence[str | int]) -> Any:
    for part in loc:
        if isinstance(raw, Mapping):
            if part not in raw:
                return None
            raw = raw[part]
        elif isinstance(raw, list | tuple) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _kind(error_type: str) -> str:
    return next((w for k, w in _TYPE_WORDS.items() if error_type.startswith(k)), "a valid value")


def _problem(err: ErrorDetails, annotation: Any) -> str:
    """What is wrong with the value, without the key: `expected ..., got ...`."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind in ("batchline_value", "batchline_checks", "value_error", "assertion_error"):
        return str(ctx.get("message") or err["msg"]).removeprefix("Value error, ")
    if kind in ("tuple_type", "list_type"):
        item = _strip(get_args(annotation)[0]) if get_args(annotation) else None
        return f"expected a list of {_PLURAL.get(item, 'values')}, got {value!r}"
    if kind in (
        "dict_type",
        "dataclass_type",
        "dataclass_exact_type",
        "model_type",
        "model_attributes_type",
    ):
        return f"expected a table, got {value!r}"
    if kind == "literal_error":
        return f"expected {str(ctx.get('expected', '')).replace(chr(39), '')}, got {value!r}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, name = bounds[kind]
        what = "an integer" if annotation is int else "a number"
        # The value as written: an environment variable's text is shown as the number it is.
        shown = value if isinstance(value, str) else repr(value)
        return f"expected {what} {op} {_number(ctx[name])}, got {shown}"
    if kind == "finite_number":
        return f"expected a finite number, got {value!r}"
    if kind == "missing":
        return "required, not given"
    if kind in _READING or kind.endswith(("_type", "_parsing")):
        return f"expected {_kind(kind)}, got {value!r}"
    return str(err["msg"])


def messages(
    errors: Iterable[ErrorDetails],
    *,
    root: Any,
    raw: Any = None,
    at: Loc = (),
    sources: Mapping[Loc, str] | None = None,
    aliases: Mapping[Loc, Loc] | None = None,
) -> list[str]:
    """pydantic's errors as batchline's messages, in pydantic's order, duplicates dropped.

    `at` prefixes every key (a section checked on its own); `sources` names the environment
    variable or flag a value's text came from (used for errors in reading that text);
    `aliases` reports a value under the key it was inherited from (a model's value taken from
    [model_defaults] is wrong there, once, not in every model)."""
    out: list[str] = []
    for err in errors:
        loc: Loc = tuple(err["loc"])
        # A list's item: the list is what the user wrote, so the list is reported.
        item = bool(loc) and isinstance(loc[-1], int)
        field = loc[:-1] if item else loc
        annotation = _annotation_at(root, field)
        if item:
            whole = _lookup(raw, field)
            word = _PLURAL.get(_strip(get_args(annotation)[0]) if get_args(annotation) else None)
            if err["type"] in _READING or err["type"].endswith(("_type", "_parsing")):
                problem = f"expected a list of {word or 'values'}, got {whole!r}"
            else:
                problem = f"{_problem(err, annotation)} (item {loc[-1]})"
        else:
            problem = _problem(err, annotation)
        for short, long in (aliases or {}).items():
            if field[: len(short)] == short:
                field = long + field[len(short) :]
                break
        key = dotted(at + field)
        if err["type"] in _UNKNOWN:
            parent = _annotation_at(root, field[:-1])
            known = ", ".join(sorted(_fields(parent)))
            origin = f"from {sources[field]}; " if sources and field in sources else ""
            out.append(f"unknown key {key} ({origin}known: {known})")
            continue
        if err["type"] == "batchline_checks":
            prefix = f"{key}." if key else ""
            for line in problem.split("\n"):
                out.append(prefix + line.replace("{at}", prefix))
            continue
        if sources and (err["type"] in _READING or item) and field in sources:
            key = sources[field]
        out.append(f"{key}: {problem}" if key else problem)
    return list(dict.fromkeys(out))
