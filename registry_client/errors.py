"""Registry errors. Each message names the model, alias, version or path it is about."""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """Base of every error the registry client raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take their own arguments rather than a message, so the default
        # (cls, (message,)) would fail to unpickle across a process boundary.
        return (type(self), self._reduce_args())

    def _reduce_args(self) -> tuple[Any, ...]:
        return self.args


class ModelNotFound(RegistryError, LookupError):
    """No model of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not registered")
        self.name = name

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.name,)


class VersionNotFound(RegistryError, LookupError):
    """The model exists but has no such version."""

    def __init__(self, name: str, version: str, known: tuple[str, ...] = ()) -> None:
        have = f" (registered: {', '.join(known)})" if known else " (no versions registered)"
        super().__init__(f"model {name!r} has no version {version!r}{have}")
        self.name = name
        self.version = version
        self.known = known

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.name, self.version, self.known)


class AliasNotFound(RegistryError, LookupError):
    """The model exists but no such alias was ever set on it."""

    def __init__(self, name: str, alias: str, known: tuple[str, ...] = ()) -> None:
        have = f" (aliases: {', '.join(known)})" if known else " (no aliases set)"
        super().__init__(f"model {name!r} has no alias {alias!r}{have}")
        self.name = name
        self.alias = alias
        self.known = known

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.name, self.alias, self.known)


class ChecksumMismatch(RegistryError):
    """A file's bytes do not hash to the sha256 recorded when its version was registered."""

    def __init__(self, path: str, expected: str, actual: str, hint: str = "") -> None:
        super().__init__(
            f"artifact {path} is corrupt or was replaced: sha256 expected {expected}, actual {actual}"
            + (f"; {hint}" if hint else "")
        )
        self.path = path
        self.expected = expected
        self.actual = actual
        self.hint = hint

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.path, self.expected, self.actual, self.hint)


class ManifestError(RegistryError):
    """A version's folder does not match its manifest (a file added, missing, linked or
    referenced that the manifest does not list), or the manifest itself does not hang together.
    The message names the file and says what to do."""


class AttachmentNotFound(RegistryError, LookupError):
    """The version exists but was registered without an attachment of that name."""

    def __init__(self, name: str, version: str, filename: str, known: tuple[str, ...] = ()) -> None:
        have = f" (attachments: {', '.join(known)})" if known else " (no attachments)"
        super().__init__(f"model {name!r} version {version} has no attachment {filename!r}{have}")
        self.name = name
        self.version = version
        self.filename = filename
        self.known = known

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.name, self.version, self.filename, self.known)


class InvalidName(RegistryError, ValueError):
    """A model name, alias or version string is not allowed (it could escape the root, say)."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(f"invalid name {value!r}: {reason}")
        self.value = value
        self.reason = reason

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.value, self.reason)


class InvalidReference(RegistryError, ValueError):
    """A model reference (`name`, `name@alias`, `name@3`) does not parse."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"invalid model reference {ref!r}: {reason}")
        self.ref = ref
        self.reason = reason

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.ref, self.reason)


class RegistryUnavailable(RegistryError):
    """The registry could not be reached or failed on its side (refused, timed out, 5xx).

    Raised only after the client's retries are spent; the message names the URL so an operator
    knows which server to look at.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"model registry at {url} is unavailable: {reason}")
        self.url = url
        self.reason = reason

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.url, self.reason)


class NothingToRollBack(RegistryError):
    """An alias has never pointed at another version, so a rollback has nowhere to go."""

    def __init__(self, name: str, alias: str, version: str) -> None:
        super().__init__(
            f"model {name!r} alias {alias!r} has only ever pointed at version {version}: "
            "nothing to roll back to"
        )
        self.name = name
        self.alias = alias
        self.version = version

    def _reduce_args(self) -> tuple[Any, ...]:
        return (self.name, self.alias, self.version)
