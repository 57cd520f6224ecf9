"""`batchline registry list | show | register | import | promote | rollback | verify |
rehash`.

Every command but ``rehash`` (file registry only) works against either backend.

``server/cli.py`` mounts these with ``add_subcommands(sub)``; ``python -m registry_client.cli
registry ...`` runs them without the server installed. Every command takes
``--registry DIR|mlflow+http://host:port`` (default: ``$BATCHLINE_REGISTRY``); a folder that
does not exist is an error, except for ``register``, which creates it. Registry errors print one
line naming the model, alias, version, file or URL and exit 1.

``register`` checks that the file can be served before it is recorded (see
``registry_client.servable``): ZipMap outputs are unwrapped, a fixed batch dimension is
refused, ``--features`` must name every input column; it then says how to serve the version.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry_client.errors import RegistryError
from registry_client.file_registry import FileRegistry
from registry_client.open import open_registry
from registry_client.profile import PROFILE_FILE
from registry_client.protocol import Registry
from registry_client.reference import profile_model
from registry_client.refs import DEFAULT_ALIAS, validate_alias, validate_name, validate_version
from registry_client.rollback import rollback
from registry_client.types import ModelVersion

PROG = "batchline registry"
REGISTRY_ENV = "BATCHLINE_REGISTRY"
if TYPE_CHECKING:
    from registry_client.triton_repo import Imported

_Handler = Callable[[argparse.Namespace], int]


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``registry`` command (and its subcommands) to a parser's subcommands.

    Each leaf sets ``func``: call ``args.func(args)`` and exit with what it returns.
    """
    registry = subparsers.add_parser(
        "registry", help="list, show, register, promote and roll back model versions"
    )
    commands = registry.add_subparsers(dest="registry_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        metavar="DIR|mlflow+http://HOST:PORT",
        help=f"a file registry folder or an MLflow tracking server (default: ${REGISTRY_ENV})",
    )

    ls = commands.add_parser("list", parents=[common], help="models, their versions and aliases")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_guarded(cmd_list))

    show = commands.add_parser(
        "show", parents=[common], help="a model's versions, aliases and alias history"
    )
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_guarded(cmd_show))

    register = commands.add_parser(
        "register", parents=[common], help="register an ONNX file as the model's next version"
    )
    register.add_argument("name")
    register.add_argument("path", type=Path, help="model.onnx")
    register.add_argument(
        "--metric", action="append", default=[], type=_metric, metavar="KEY=VALUE"
    )
    register.add_argument("--tag", action="append", default=[], type=_tag, metavar="KEY=VALUE")
    register.add_argument(
        "--features", default="", help="comma-separated input feature names, in order"
    )
    register.add_argument("--description", default="")
    register.add_argument("--source", default="batchline registry register")
    register.add_argument("--alias", type=_alias, help="also point this alias at the new version")
    register.add_argument(
        "--attach",
        action="append",
        default=[],
        type=_attachment,
        metavar="[NAME=]PATH",
        help="a file registered with the version (feature_view.json, profile.json, ...); "
        "its name in the version defaults to the file's name",
    )
    register.add_argument(
        "--reference",
        type=Path,
        metavar="DATA",
        help="CSV, Parquet, .npy or .npz of the training features: profiled (with the model's own "
        "scores on them) into the version's profile.json, so the drift sidecar can watch it",
    )
    register.add_argument(
        "--no-zipmap-unwrap",
        action="store_true",
        help="refuse a ZipMap output (skl2onnx's default for classifiers) instead of unwrapping "
        "it into an FP32 [N, classes] tensor; the registered bytes are then the file given",
    )
    register.set_defaults(func=_guarded(cmd_register))

    imp = commands.add_parser(
        "import",
        parents=[common],
        help="register a Triton model repository (NAME/config.pbtxt, NAME/N/model.onnx) or a .onnx",
    )
    imp.add_argument("path", type=Path, metavar="DIR|FILE.onnx")
    imp.add_argument("--name", help="the model's name (one model or a bare .onnx)")
    imp.add_argument(
        "--alias", type=_alias, default=DEFAULT_ALIAS, help="point it at the newest (production)"
    )
    imp.add_argument("--config-out", type=Path, help="write the [models.NAME] tables here")
    imp.set_defaults(func=_guarded(cmd_import))

    promote = commands.add_parser(
        "promote", parents=[common], help="point an alias at a version (default: production)"
    )
    promote.add_argument("name")
    promote.add_argument("version", type=_version)
    promote.add_argument("--alias", type=_alias, default=DEFAULT_ALIAS)
    promote.set_defaults(func=_guarded(cmd_promote))

    back = commands.add_parser(
        "rollback", parents=[common], help="return an alias to the version it held before"
    )
    back.add_argument("name")
    back.add_argument("--alias", type=_alias, default=DEFAULT_ALIAS)
    back.set_defaults(func=_guarded(cmd_rollback))

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="check every file of a version against its manifest, as the server does on load",
    )
    verify.add_argument("ref", help="NAME, NAME@ALIAS or NAME@VERSION")
    verify.set_defaults(func=_guarded(cmd_verify))

    profile = commands.add_parser(
        "profile",
        parents=[common],
        help="give a version without a reference profile one: registers the same model and "
        "files as the next version, with profile.json (versions are immutable)",
    )
    profile.add_argument("name")
    profile.add_argument("version", type=_version)
    profile.add_argument("--reference", type=Path, required=True, metavar="DATA")
    profile.add_argument(
        "--features", default="", help="comma-separated feature column names, in input order"
    )
    profile.add_argument("--alias", type=_alias, help="also point this alias at the new version")
    profile.set_defaults(func=_guarded(cmd_profile))

    rehash = commands.add_parser(
        "rehash",
        parents=[common],
        help="write a manifest for a version registered before manifests (file registry), "
        "after you checked its folder",
    )
    rehash.add_argument("name")
    rehash.add_argument("version", type=_version)
    rehash.set_defaults(func=_guarded(cmd_rehash))


def cmd_list(args: argparse.Namespace) -> int:
    registry = _open(args)
    rows: list[dict[str, Any]] = []
    for name in registry.list_models():
        versions = [mv.version for mv in registry.list_versions(name)]
        rows.append({"name": name, "versions": versions, "aliases": registry.aliases(name)})
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no models in {_spec(args)[0]}")
        return 0
    width = max(len("MODEL"), *(len(r["name"]) for r in rows))
    print(f"{'MODEL':<{width}}  {'VERSIONS':<8}  {'LATEST':<6}  ALIASES")
    for r in rows:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(r["aliases"].items())) or "-"
        latest = r["versions"][-1] if r["versions"] else "-"
        print(f"{r['name']:<{width}}  {len(r['versions']):<8}  {latest:<6}  {aliases}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _open(args)
    versions = registry.list_versions(args.name)
    aliases = registry.aliases(args.name)
    history = {alias: registry.alias_history(args.name, alias) for alias in sorted(aliases)}
    if args.json:
        _print_json(
            {
                "name": args.name,
                "aliases": aliases,
                "alias_history": {
                    a: [{"version": v, "at": at} for v, at in h] for a, h in history.items()
                },
                "versions": [mv.to_dict() for mv in versions],
            }
        )
        return 0
    print(f"{args.name}: {len(versions)} version{'s' if len(versions) != 1 else ''}")
    for mv in versions:
        pointing = sorted(a for a, v in aliases.items() if v == mv.version)
        print(f"  version {mv.version}  [{', '.join(pointing) or '-'}]  {_summary(mv)}")
        if mv.description:
            print(f"    {mv.description}")
    for alias, moves in history.items():
        trail = " -> ".join(v for v, _at in moves)
        print(f"  {alias}: {trail}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from registry_client import servable

    validate_name(args.name)
    features = tuple(f.strip() for f in args.features.split(",") if f.strip())
    spec, _label = _spec(args)
    folder = _local_folder(spec)
    new_folder = folder is not None and not folder.exists()
    with servable.work_dir() as scratch:
        prepared = servable.prepare(
            args.path, Path(scratch), unwrap_zipmap=not args.no_zipmap_unwrap
        )
        servable.check_features(features, prepared.signature, args.path)
        attachments = dict(args.attach)
        if args.reference is not None:
            if PROFILE_FILE in attachments:
                raise RegistryError(
                    f"--reference and --attach {PROFILE_FILE}: give the reference data or a "
                    "profile, not both"
                )
            profile = profile_model(prepared.path, args.reference, features)
            attachments[PROFILE_FILE] = Path(scratch) / PROFILE_FILE
            attachments[PROFILE_FILE].write_text(profile.to_json())
        registry = _open(args, create=True)
        mv = registry.register(
            args.name,
            prepared.path,
            signature=prepared.signature,
            metrics=dict(args.metric),
            tags={**prepared.tags, **dict(args.tag)},
            features=features,
            source=args.source,
            description=args.description,
            attachments=attachments,
        )
    print(f"registered {mv.name} version {mv.version}  {_summary(mv)}")
    if args.reference is not None:
        print(f"  reference profile from {args.reference} ({profile.rows} rows) in {PROFILE_FILE}")
    if new_folder:
        print(f"  (a new file registry, at {folder})")
    for note in prepared.notes:
        print(f"  {note}")
    if args.alias:
        _move(registry, mv.name, args.alias, mv.version)
    _how_to_serve(args, registry, mv.name, mv.version)
    return 0


def import_folder(
    path: Path, name: str | None, open_target: Callable[[], Registry], alias: str
) -> list[Imported]:
    """Register the models at `path` (a Triton repository, one model's folder, a folder of one
    .onnx, or a bare .onnx) into the registry `open_target` opens, each newest version under
    `alias`. Every config is read and every model file checked servable (ZipMap unwrapped, as
    `register` does) before anything is written."""
    from registry_client import servable
    from registry_client.triton_repo import find_models, import_models

    models = find_models(path, name)
    with servable.work_dir() as scratch:
        prepared = {}
        for i, file in enumerate(p for m in models for _, p in m.versions):
            work = Path(scratch) / str(i)
            work.mkdir()
            prepared[file] = servable.prepare(file, work)
        registry = open_target()
        imported = import_models(
            registry,
            models,
            lambda file: (prepared[file].path, prepared[file].signature, prepared[file].tags),
            source=f"batchline registry import {path}",
        )
    for item in imported:
        newest = item.versions[-1][1]
        _move(registry, newest.name, alias, newest.version)
    return imported


def cmd_import(args: argparse.Namespace) -> int:
    from registry_client.triton_repo import toml_table

    imported = import_folder(
        args.path, args.name, lambda: _open(args, create=True), args.alias or DEFAULT_ALIAS
    )
    tables = []
    for item in imported:
        for triton_version, mv in item.versions:
            print(
                f"imported {mv.name} Triton version {triton_version} as version {mv.version}  "
                f"{_summary(mv)}"
            )
        newest = item.versions[-1][1]
        tables.append(toml_table(item.model, f"{newest.name}@{args.alias or DEFAULT_ALIAS}"))
    text = "\n\n".join(tables) + "\n"
    if args.config_out is not None:
        args.config_out.write_text(text)
        print(f"serving settings from config.pbtxt written to {args.config_out}")
    else:
        print("\n# batchline.toml, from config.pbtxt:\n" + text, end="")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    registry = _open(args)
    _move(registry, args.name, args.alias, args.version)
    print(
        f"a server serving {args.name}@{args.alias} swaps to it at its next registry check "
        f"(poll_interval_s, 2 s by default), or now: batchline admin reload {args.name}"
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    registry = _open(args)
    before = registry.aliases(args.name).get(args.alias, "-")
    target = rollback(registry, args.name, args.alias)
    print(f"{args.name}@{args.alias}: rolled back {before} -> {target}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    registry = _open(args)
    mv = registry.resolve(args.ref)
    registry.fetch(mv)
    if not mv.files:
        print(
            f"{mv.name} version {mv.version}: model.onnx verified (sha256={mv.sha256[:12]}); "
            "registered before manifests, so its other files are not: check them and run "
            f"`{PROG} rehash {mv.name} {mv.version}`"
        )
        return 0
    print(
        f"{mv.name} version {mv.version}: {len(mv.files)} files verified, "
        f"manifest sha256={mv.manifest_sha256}"
    )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import tempfile

    registry = _open(args)
    mv = registry.get_version(args.name, args.version)
    model = registry.fetch(mv)
    features = tuple(f.strip() for f in args.features.split(",") if f.strip()) or mv.features
    profile = profile_model(model, args.reference, features)
    attachments: dict[str, Path] = {}
    for filename in sorted(getattr(mv, "files", {}) or {}):
        if filename in ("model.onnx", PROFILE_FILE) or filename in getattr(mv, "external_data", ()):
            continue
        attachments[filename] = registry.attachment(mv.name, mv.version, filename)
    with tempfile.TemporaryDirectory(prefix="batchline-profile-") as scratch:
        path = Path(scratch) / PROFILE_FILE
        path.write_text(profile.to_json())
        attachments[PROFILE_FILE] = path
        new = registry.register(
            mv.name,
            model,
            signature=mv.signature,
            metrics=mv.metrics,
            tags=mv.tags,
            features=features,
            source=f"batchline registry profile {mv.name} {mv.version}",
            description=mv.description,
            attachments=attachments,
        )
    print(
        f"registered {new.name} version {new.version}: version {mv.version}'s model and files "
        f"with a reference profile from {args.reference} ({profile.rows} rows)"
    )
    if args.alias:
        _move(registry, new.name, args.alias, new.version)
    _how_to_serve(args, registry, new.name, new.version)
    return 0


def cmd_rehash(args: argparse.Namespace) -> int:
    registry = _open(args)
    if not isinstance(registry, FileRegistry):
        raise RegistryError(
            f"rehash writes a file registry's metadata; {args.registry} is not one (register the "
            "model again to give it a manifest)"
        )
    mv = registry.rehash(args.name, args.version)
    print(f"{mv.name} version {mv.version}: manifest written, sha256={mv.manifest_sha256}")
    for relative, digest in sorted(mv.files.items()):
        kind = (
            "model"
            if relative == "model.onnx"
            else "external data"
            if relative in mv.external_data
            else "attachment"
        )
        print(f"  {digest}  {relative}  ({kind})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry_client.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


# -- internals -------------------------------------------------------------------------------


def _guarded(command: _Handler) -> _Handler:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RegistryError as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"{PROG} {args.registry_command}: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            raise  # the caller decides how to end quietly
        except OSError as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()  # the registry folder or the model file: unreadable, read-only
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"{PROG} {args.registry_command}: {where}{exc.strerror or exc}", file=sys.stderr)
            return 1

    return run


def _move(registry: Registry, name: str, alias: str, version: str) -> None:
    before = registry.aliases(name).get(alias, "-")
    registry.set_alias(name, alias, version)
    print(f"{name}@{alias}: {before} -> {version}")


def registry_spec(given: str | None, flag: str = "--registry") -> tuple[str, str]:
    """The registry to use and how to name it in messages: the flag's value, else
    $BATCHLINE_REGISTRY; neither is an error saying how to give one."""
    if given:
        return given, f"{flag} {given}"
    env = os.environ.get(REGISTRY_ENV, "")
    if env:
        return env, f"{REGISTRY_ENV}={env}"
    raise RegistryError(
        f"no registry given: pass {flag} DIR (or mlflow+http://HOST:PORT) or set {REGISTRY_ENV}"
    )


def check_registry_folder(spec: str, label: str) -> None:
    """A local registry must be an existing folder (reads never create one)."""
    folder = _local_folder(spec)
    if folder is None:
        return
    if not folder.exists():
        raise RegistryError(
            f"{label}: no such folder (a registry is created by its first "
            f"`batchline registry register NAME model.onnx --registry {spec}`)"
        )
    if not folder.is_dir():
        raise RegistryError(f"{label}: not a folder (a file registry is a folder)")


def _spec(args: argparse.Namespace) -> tuple[str, str]:
    return registry_spec(args.registry)


def _open(args: argparse.Namespace, *, create: bool = False) -> Registry:
    spec, label = _spec(args)
    folder = _local_folder(spec)
    if folder is not None and (not create or folder.exists()):
        check_registry_folder(spec, label)
    try:
        return open_registry(spec)
    except RegistryError as exc:
        raise RegistryError(f"{label}: {exc}") from exc


def _local_folder(spec: str) -> Path | None:
    """The folder a file registry spec names, None for a remote one."""
    if spec.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(spec).path))
    if "://" in spec:
        return None
    return Path(spec).expanduser()


def _how_to_serve(args: argparse.Namespace, registry: Registry, name: str, version: str) -> None:
    """Say what serves the new version: it is served only through an alias (or pinned)."""
    where = f" --registry {args.registry}" if args.registry else ""
    alias = args.alias or DEFAULT_ALIAS
    if args.alias:
        print(f"serve it: batchline serve{where} --model {name}@{alias}")
        return
    current = registry.aliases(name).get(DEFAULT_ALIAS)
    now = (
        f"{name}@{DEFAULT_ALIAS} is version {current}"
        if current
        else f"no alias points at {name} yet, so {name}@{DEFAULT_ALIAS} does not resolve"
    )
    print(
        f"not served yet: {now}; to serve version {version}: "
        f"batchline registry promote {name} {version}{where} "
        f"(or register with --alias {DEFAULT_ALIAS}; --model {name}@{version} pins it)"
    )


def _summary(mv: ModelVersion) -> str:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(mv.metrics.items()))
    inputs = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in mv.signature.inputs)
    files = (
        f"manifest={mv.manifest_sha256[:12]} ({len(mv.files)} files)"
        if mv.files
        else "manifest=- (registered before manifests)"
    )
    parts = [mv.created, f"sha256={mv.sha256[:12]}", files, f"inputs {inputs or '-'}", metrics]
    return "  ".join(p for p in parts if p)


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _metric(text: str) -> tuple[str, float]:
    key, value = _key_value(text)
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"metric {key!r}: {value!r} is not a number") from None


def _tag(text: str) -> tuple[str, str]:
    return _key_value(text)


def _attachment(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected [NAME=]PATH, got {text!r}")
    return name, Path(path)


def _alias(text: str) -> str:
    try:
        return validate_alias(text)
    except RegistryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version(text: str) -> str:
    try:
        return validate_version(text)
    except RegistryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
