"""batchline.admin.v1.AdminService: reload and status. Bearer-token guarded when configured."""

from __future__ import annotations

import hmac
from typing import Any

import grpc

from server._proto import admin_pb2 as pb
from server._proto import admin_pb2_grpc as pb_grpc
from server.api.status import abort
from server.errors import InvalidArgument, ServingError
from server.models import ModelManager, ModelSlot
from server.routing import Route, ShadowSpec


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


def _route_message(route: Route) -> Any:
    return pb.RouteSpec(
        model=route.model,
        primary=route.primary,
        canary=route.canary or "",
        canary_percent=route.canary_percent,
        shadows=[
            pb.ShadowTarget(version=s.version, sample_percent=s.sample_percent)
            for s in route.shadows
        ],
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
            await abort(context, exc)
        return pb.ReloadModelResponse(
            model=outcome.model,
            version=outcome.version,
            previous_version=outcome.previous_version,
            changed=outcome.changed,
            message=outcome.message,
        )

    async def GetRoute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await require_admin(context, self._token)
        try:
            served = self._models.get(request.model)
        except ServingError as exc:
            await abort(context, exc)
        route = self._models.route(request.model) or Route(request.model, served.key.version)
        return _route_message(route)

    async def SetRoute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await require_admin(context, self._token)
        try:
            served = self._models.get(request.model)
            try:
                route = Route(
                    model=request.model,
                    primary=request.primary or served.key.version,
                    canary=request.canary or None,
                    canary_percent=request.canary_percent,
                    shadows=tuple(
                        ShadowSpec(s.version, s.sample_percent or 100.0) for s in request.shadows
                    ),
                )
            except ValueError as exc:
                raise InvalidArgument(f"route for {request.model}: {exc}") from exc
            route = await self._models.set_route(request.model, route)
        except ServingError as exc:
            await abort(context, exc)
        return _route_message(route)

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
