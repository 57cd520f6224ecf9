"""batchline.admin.v1.AdminService: reload and status. Bearer-token guarded when configured."""

from __future__ import annotations

import hmac
from typing import Any

import grpc

from server._proto import admin_pb2 as pb
from server._proto import admin_pb2_grpc as pb_grpc
from server.api.status import STATUS
from server.errors import ServingError
from server.models import ModelManager, ModelSlot


def authorized(context: grpc.aio.ServicerContext, token: str) -> bool:
    """True when no token is configured or the call carries `authorization: Bearer <token>`."""
    if not token:
        return True
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, given = value.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(
                given.encode(), token.encode()
            )
    return False


async def require_admin(context: grpc.aio.ServicerContext, token: str) -> None:
    if not authorized(context, token):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "admin call needs metadata authorization: Bearer <token>",
        )


def model_state(slot: ModelSlot) -> Any:
    served = slot.current
    mv = served.version_info
    return pb.ModelState(
        name=served.key.name,
        version=served.key.version,
        ref=slot.settings.ref,
        alias=served.alias or "",
        sha256=mv.sha256,
        state=slot.state,
        last_error=slot.last_error,
        loaded_at_unix_ms=slot.loaded_at_ms,
        last_check_unix_ms=slot.last_check_ms,
        metrics=dict(mv.metrics),
        tags=dict(mv.tags),
        source=mv.source,
        created=mv.created,
        execution="inline" if served.inline else "executor",
        reloads=slot.reloads,
        failed_reloads=slot.failed_reloads,
    )


class AdminServicer(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    def __init__(self, models: ModelManager, token: str) -> None:
        self._models = models
        self._token = token

    async def ReloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await require_admin(context, self._token)
        try:
            outcome = await self._models.reload(request.model, request.ref or None)
        except ServingError as exc:
            await context.abort(STATUS[exc.kind], exc.message)
        return pb.ReloadModelResponse(
            model=outcome.model,
            version=outcome.version,
            previous_version=outcome.previous_version,
            changed=outcome.changed,
            message=outcome.message,
        )

    async def ModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        slots = self._models.slots
        if request.model:
            slot = slots.get(request.model)
            if slot is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"unknown model '{request.model}' (served: {', '.join(sorted(slots))})",
                )
            chosen = [slot]
        else:
            chosen = list(slots.values())
        return pb.ModelStatusResponse(models=[model_state(s) for s in chosen if s is not None])
