"""What a model version is made of: its files, their digests, and the ONNX external data its
graph loads.

A version's *manifest* maps every file of the version (``model.onnx``, each external-data file
the graph references, each attachment) by its path relative to the version folder to the hex
sha256 of its bytes. The *manifest digest* is one sha256 over the whole manifest: the sha256 of
the ``sha256sum``-style listing ``"<digest>  <path>\\n"``, one line per file sorted by path, so an
operator can recompute it with standard tools::

    cd ROOT/NAME/VERSION && find . -type f ! -name metadata.json -printf '%P\\n' \\
        | LC_ALL=C sort | xargs sha256sum | sha256sum

External data is read straight from the protobuf wire format (``onnx`` is in the ``train``
extra, not a serving dependency): every TensorProto reachable from the model (graph and
subgraph initializers, sparse initializers, tensor attributes of nodes, functions and training
graphs) whose ``external_data`` names a ``location``, or whose ``data_location`` is EXTERNAL.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from registry_client.errors import ChecksumMismatch, InvalidName, ManifestError, RegistryError
from registry_client.refs import validate_name

ARTIFACT = "model.onnx"
METADATA = "metadata.json"
# Paths inside a version folder that are never external data or attachments.
RESERVED = frozenset({ARTIFACT, METADATA})
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_COMPONENT_BYTES = 255
_MAX_DEPTH = 100  # protobuf's own default recursion limit

# -- the manifest ----------------------------------------------------------------------------


def manifest_digest(files: Mapping[str, str]) -> str:
    """sha256 of the listing ``"<sha256>  <path>\\n"`` per file, sorted by path."""
    listing = "".join(f"{files[path]}  {path}\n" for path in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


def check_manifest(
    files: Mapping[str, str],
    *,
    sha256: str,
    digest: str,
    external_data: Iterable[str],
    where: str,
) -> None:
    """Refuse a manifest that does not hang together (ManifestError naming `where`, usually
    the metadata file): a bad path or digest, a model digest other than `sha256`, external data
    the manifest does not list, or a manifest digest that is not `digest`."""
    problem = ""
    if files.get(ARTIFACT) != sha256:
        problem = f"its manifest's {ARTIFACT} digest is not the version's sha256 {sha256}"
    for path, value in files.items():
        if path != ARTIFACT and relative_path(path, what="manifest entry", check=False) != path:
            problem = f"manifest entry {path!r} is not a plain relative path"
        elif _SHA256.fullmatch(value) is None:
            problem = f"manifest entry {path!r} has no valid sha256 ({value!r})"
    for path in external_data:
        if path not in files:
            problem = f"external-data file {path!r} is not in the manifest"
    if not problem and manifest_digest(files) != digest:
        problem = f"its manifest does not hash to the recorded manifest_sha256 {digest}"
    if problem:
        raise ManifestError(
            f"{where} is inconsistent: {problem}. It was edited after registration: restore it, "
            "or register the model again"
        )


def relative_path(location: str, *, what: str, check: bool = True) -> str:
    """`location` as a normalised path inside a version folder ("./a//b" -> "a/b").

    Refused (ManifestError): absolute paths (``/x``, ``C:\\x``), ``..``,
    backslashes, control characters, hidden components (``.x``: the registry's own temporary
    files start with a dot), components over 255 bytes, and ``model.onnx`` / ``metadata.json``.
    With ``check=False`` a refusal returns "" instead of raising.
    """
    reason = ""
    parts = [p for p in location.split("/") if p not in {"", "."}]
    if not location or not parts:
        reason = "is empty"
    elif location.startswith("/") or re.match(r"[A-Za-z]:(/|$)", location):
        reason = "is an absolute path"
    elif "\\" in location:
        reason = "contains a backslash"
    elif any(ord(c) < 32 or ord(c) == 127 for c in location):
        reason = "contains a control character"
    elif ".." in parts:
        reason = "escapes the model's folder (..)"
    elif any(p.startswith(".") for p in parts):
        reason = "has a hidden (dot) component"
    elif any(len(p.encode()) > _MAX_COMPONENT_BYTES for p in parts):
        reason = f"has a component longer than {_MAX_COMPONENT_BYTES} bytes"
    elif "/".join(parts) in RESERVED:
        reason = "is reserved by the registry"
    if reason:
        if not check:
            return ""
        raise ManifestError(f"{what} {location!r} {reason}")
    return "/".join(parts)


def check_attachments(name: str, attachments: Mapping[str, Path] | None) -> dict[str, Path]:
    """Attachment name -> source file, each name a plain file name the registry does not use
    itself, each source an existing file (InvalidName / RegistryError naming it otherwise)."""
    extra = {str(k): Path(v) for k, v in (attachments or {}).items()}
    for filename, path in extra.items():
        validate_name(filename, what="attachment name")
        if filename in RESERVED:
            raise InvalidName(filename, "attachment name is reserved by the registry")
        if not path.is_file():
            raise RegistryError(f"cannot register model {name!r}: attachment {path} is not a file")
    return extra


def external_sources(
    name: str, model: Path, external: Iterable[str], attachments: Mapping[str, Path]
) -> dict[str, Path]:
    """External-data path in the version -> the file beside `model` it is copied from; refused
    when missing or when an attachment would take its place."""
    sources: dict[str, Path] = {}
    for relative in external:
        if relative in attachments:
            raise InvalidName(relative, f"attachment name is the external data {model} references")
        data = model.parent / relative
        if not data.is_file():
            raise ManifestError(
                f"cannot register model {name!r}: {model} references external data {data}, "
                "which is missing; save the model with its data beside it"
            )
        sources[relative] = data
    return sources


# -- files on disk ---------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


class DigestCache:
    """sha256 of files, remembered per path while the file's identity is unchanged.

    The identity is (device, inode, size, mtime, ctime): rewriting a file in place and setting
    its mtime back still changes its ctime, and a file renamed over it has another inode. A
    digest is remembered only if the file did not change while it was being hashed. One entry
    per path, so the cache never outgrows the files it has seen.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, ...], str]] = {}
        self._lock = threading.Lock()

    def digest(self, path: Path) -> str:
        key = str(path)
        before = _identity(os.stat(path))
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[0] == before:
            return known[1]
        actual = sha256_file(path)
        if _identity(os.stat(path)) == before:
            with self._lock:
                self._known[key] = (before, actual)
        return actual


class ExternalDataCache:
    """The external-data files a model.onnx references, parsed once per model digest (both
    registries ask on every fetch; the graph of a given sha256 never changes)."""

    def __init__(self, digests: DigestCache) -> None:
        self._digests = digests
        self._known: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def files(self, model: Path, sha256: str) -> tuple[str, ...]:
        """`model`'s external-data locations; ChecksumMismatch if it was replaced meanwhile."""
        with self._lock:
            known = self._known.get(sha256)
        if known is not None:
            return known
        found = external_data_files(model)
        actual = self._digests.digest(model)
        if actual != sha256:  # replaced while it was being read
            raise ChecksumMismatch(str(model), sha256, actual)
        with self._lock:
            self._known[sha256] = found
        return found


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def folder_files(folder: Path, *, skip: frozenset[str] = frozenset({METADATA})) -> list[str]:
    """Every file under `folder`, as sorted relative POSIX paths, top-level names in `skip` left
    out. A symbolic link or anything but a plain file or folder is refused (ManifestError):
    the registry stores plain files only."""
    found: list[str] = []

    def walk(current: Path, prefix: str) -> None:
        with os.scandir(current) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if not prefix and entry.name in skip:
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise ManifestError(
                        f"{current / entry.name} is a symbolic link: a registry version holds "
                        "plain files only; remove it (or register the model again)"
                    )
                if stat.S_ISDIR(mode):
                    walk(current / entry.name, rel + "/")
                elif stat.S_ISREG(mode):
                    found.append(rel)
                else:
                    raise ManifestError(
                        f"{current / entry.name} is not a plain file; remove it from the version"
                    )

    walk(folder, "")
    return sorted(found)


# -- ONNX external data, from the protobuf wire format ----------------------------------------

# Message kinds, and for each the length-delimited fields that lead (transitively) to tensors.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    # ModelProto: graph = 7, training_info = 20, functions = 25
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    # TrainingInfoProto: initialization = 1, algorithm = 2
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    # FunctionProto: node = 7, attribute_proto = 11
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    # GraphProto: node = 1, initializer = 5, sparse_initializer = 15
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    # NodeProto: attribute = 5
    _NODE: {5: _ATTRIBUTE},
    # AttributeProto: t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22,
    # sparse_tensors = 23
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    # SparseTensorProto: values = 1, indices = 2
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_MODEL_GRAPH = 7
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


class _Malformed(Exception):
    pass


def external_data_files(model: Path, *, label: str = "") -> tuple[str, ...]:
    """The external-data files `model`'s tensors reference, as sorted normalised paths
    relative to the model's folder (where ONNX Runtime looks for them).

    Raises RegistryError when the file is not an ONNX model in protobuf wire format (or has
    no graph), ManifestError when a location is unsafe (see ``relative_path``) or a tensor is
    EXTERNAL without one. Messages name the file as `label` (default: its path).
    """
    label = label or str(model)
    try:
        with model.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise _Malformed("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                tensors: list[tuple[str, bool, list[str]]] = []
                has_graph = _MODEL_GRAPH in _walk(buf, 0, len(buf), _MODEL, 0, tensors)
    except _Malformed as exc:
        raise RegistryError(f"{label} is not an ONNX model: {exc}") from None
    except OSError as exc:
        raise RegistryError(f"cannot read {label}: {exc}") from exc
    if not has_graph:
        raise RegistryError(f"{label} is not an ONNX model: it has no graph")
    found: set[str] = set()
    for name, external, locations in tensors:
        if external and not locations:
            raise ManifestError(
                f"{label}: tensor {name!r} is stored externally but names no location"
            )
        for location in locations:
            found.add(relative_path(location, what=f"{label}: tensor {name!r} external data"))
    return tuple(sorted(found))


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Malformed(f"truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: mmap.mmap, pos: int, end: int, depth: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of every field."""
    out: list[tuple[int, int, int, int]] = []
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {start}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            out.append((number, wire, value, pos))
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > end:
                raise _Malformed(f"truncated fixed-width field at byte {start}")
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _Malformed(f"field {number} at byte {start} runs past its message")
            out.append((number, wire, pos, pos + length))
            pos += length
        elif wire == _SGROUP:
            pos = _skip_group(buf, pos, end, number, depth + 1)
        else:  # a lone end-group, or wire types 6 and 7
            raise _Malformed(f"unexpected wire type {wire} at byte {start}")
    if pos != end:
        raise _Malformed(f"a field runs past its message at byte {end}")
    return out


def _skip_group(buf: mmap.mmap, pos: int, end: int, number: int, depth: int) -> int:
    """The position after the end-group tag that closes group `number` (a deprecated proto2
    encoding protobuf still accepts in unknown fields)."""
    if depth > _MAX_DEPTH:
        raise _Malformed(f"nested deeper than {_MAX_DEPTH}")
    while pos < end:
        start = pos
        tag, pos = _varint(buf, pos, end)
        inner, wire = tag >> 3, tag & 7
        if wire == _EGROUP:
            if inner != number:
                raise _Malformed(f"mismatched end of group at byte {start}")
            return pos
        if wire == _VARINT:
            _, pos = _varint(buf, pos, end)
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            pos += length
        elif wire == _SGROUP:
            pos = _skip_group(buf, pos, end, inner, depth + 1)
        else:
            raise _Malformed(f"unexpected wire type {wire} at byte {start}")
        if pos > end:
            raise _Malformed(f"truncated group at byte {start}")
    raise _Malformed("unterminated group")


def _walk(
    buf: mmap.mmap,
    pos: int,
    end: int,
    kind: int,
    depth: int,
    tensors: list[tuple[str, bool, list[str]]],
) -> list[int]:
    """Collect the tensors under one message; returns the field numbers it descended into."""
    if depth > _MAX_DEPTH:
        raise _Malformed(f"nested deeper than {_MAX_DEPTH}")
    if kind == _TENSOR:
        tensors.append(_tensor(buf, pos, end, depth))
        return []
    children = _CHILDREN[kind]
    seen = []
    for number, wire, start, stop in _fields(buf, pos, end, depth):
        child = children.get(number)
        if child is not None and wire == _LEN:
            seen.append(number)
            _walk(buf, start, stop, child, depth + 1, tensors)
    return seen


def _tensor(buf: mmap.mmap, pos: int, end: int, depth: int) -> tuple[str, bool, list[str]]:
    name = ""
    external = False
    locations: list[str] = []
    for number, wire, start, stop in _fields(buf, pos, end, depth):
        if number == _TENSOR_NAME and wire == _LEN:
            name = _text(buf, start, stop)
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = start == _EXTERNAL  # the last value wins, as in protobuf
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            key = value = ""
            for n, w, s, e in _fields(buf, start, stop, depth + 1):
                if n == 1 and w == _LEN:
                    key = _text(buf, s, e)
                elif n == 2 and w == _LEN:
                    value = _text(buf, s, e)
            if key == "location":
                locations.append(value)
    return name, external, locations


def _text(buf: mmap.mmap, start: int, stop: int) -> str:
    try:
        return buf[start:stop].decode()
    except UnicodeDecodeError:
        raise _Malformed(f"a string at byte {start} is not UTF-8") from None
