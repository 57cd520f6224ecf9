"""The served models: what a served version is (served), how one is loaded (loading), and the
manager that owns them, swaps them on reload and routes, and retires them (lifecycle)."""

from server.models.lifecycle import ModelManager, reload_backoff
from server.models.served import (
    ModelNotServed,
    ModelSlot,
    ModelStatus,
    ReloadOutcome,
    ServedModel,
)

__all__ = [
    "ModelManager",
    "ModelNotServed",
    "ModelSlot",
    "ModelStatus",
    "ReloadOutcome",
    "ServedModel",
    "reload_backoff",
]
