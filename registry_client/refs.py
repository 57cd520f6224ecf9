"""Model references (`churn`, `churn@production`, `churn@3`) and the name rules behind them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry_client.errors import InvalidName, InvalidReference

DEFAULT_ALIAS = "production"

# One path segment at most: no separators, no leading dot, so a name can never climb out of
# the registry root or hide as a dotfile.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[0-9]{1,18}")


def validate_name(value: str, *, what: str = "model name") -> str:
    """Return `value` unchanged if it is a safe model name; raise InvalidName otherwise."""
    if value in {"", ".", ".."}:
        raise InvalidName(value, f"{what} must not be empty, '.' or '..'")
    if _NAME.fullmatch(value) is None:
        raise InvalidName(
            value,
            f"{what} must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}} (no '/', no leading '.')",
        )
    return value


def validate_alias(value: str) -> str:
    """Return the alias in canonical (lower) case; raise InvalidName if it is not a safe alias.

    Aliases are case-insensitive so that an MLflow stage such as `Production` and the alias
    `production` are the same thing. An all-digit alias would read as a version, so it is refused.
    """
    validate_name(value, what="alias")
    if _VERSION.fullmatch(value) is not None:
        raise InvalidName(value, "alias must not be all digits (that reads as a version)")
    return value.lower()


def validate_version(value: str) -> str:
    """Return the version in canonical form ("007" -> "7"); raise InvalidName unless it is > 0."""
    if _VERSION.fullmatch(value) is None or int(value) == 0:
        raise InvalidName(value, "version must be a positive integer such as '1' or '2'")
    return str(int(value))


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed reference: a valid model name and exactly one of a lower-case alias or a version."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if (self.alias is None) == (self.version is None):
            raise InvalidReference(str(self), "give exactly one of an alias or a version")
        if self.alias is not None and validate_alias(self.alias) != self.alias:
            raise InvalidReference(str(self), "alias must be lower case (use parse_ref)")
        if self.version is not None and validate_version(self.version) != self.version:
            raise InvalidReference(str(self), "version must be canonical (use parse_ref)")

    def __str__(self) -> str:
        return f"{self.name}@{self.alias if self.alias is not None else self.version}"


def parse_ref(ref: str) -> ModelRef:
    """Parse `name`, `name@alias` or `name@<version>`; a bare name means `name@production`."""
    if not ref:
        raise InvalidReference(ref, "empty reference")
    name, sep, target = ref.partition("@")
    if not sep:
        return ModelRef(validate_name(name), alias=DEFAULT_ALIAS)
    if not target:
        raise InvalidReference(ref, "nothing after '@' (expected an alias or a version)")
    if "@" in target:
        raise InvalidReference(ref, "more than one '@'")
    validate_name(name)
    if target.isascii() and target.isdigit():
        return ModelRef(name, version=validate_version(target))
    return ModelRef(name, alias=validate_alias(target))
