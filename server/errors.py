"""Domain error kinds. Only server/api maps a kind to a gRPC status code."""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    CANCELLED = "cancelled"
    UNAUTHENTICATED = "unauthenticated"
    FAILED_PRECONDITION = "failed_precondition"
    INTERNAL = "internal"


class ServingError(Exception):
    """An error a caller is told about: a kind (mapped to a status at the edge) and a message."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(ServingError):
    kind = ErrorKind.NOT_FOUND


class ResourceExhausted(ServingError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class TooLarge(ResourceExhausted):
    """A request over a size limit (max_tensor_elements): RESOURCE_EXHAUSTED on gRPC, 413 on
    HTTP, where 429 would tell the client to retry it as it is."""


class DeadlineExceeded(ServingError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unavailable(ServingError):
    kind = ErrorKind.UNAVAILABLE


class FailedPrecondition(ServingError):
    kind = ErrorKind.FAILED_PRECONDITION


class ModelError(ServingError):
    """The model itself failed while running a batch (counted; fails only that batch)."""

    kind = ErrorKind.INTERNAL


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the key.

    Settings report every problem they find at once: `problems` holds one message per problem
    (first found first), and the message is those lines (one line for one problem)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)

    @classmethod
    def of(cls, problems: Sequence[str]) -> ConfigError:
        return cls("\n".join(problems), problems)
