"""batchline.admin.v1.AdminService: reload, routes and status, behind one AdminGuard
(applied to every method where the handlers are built: server/api/server.guarded)."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import grpc

from server._proto import admin_pb2 as pb
from server._proto import admin_pb2_grpc as pb_grpc
from server.api.status import abort
from server.control import ControlPlane
from server.errors import InvalidArgument, ServingError
from server.models import ModelManager, ModelSlot
from server.net import is_loopback
from server.routing import Route, ShadowSpec

log = logging.getLogger("server.api.admin")


def resolve_admin_token(token: str, token_file: str) -> str:
    """The configured token: given directly (flag, BATCHLINE_ADMIN_TOKEN) or read from a file
    (config checked that it is readable and not empty)."""
    if token_file:
        return Path(token_file).read_text().strip()
    return token


class AdminGuard:
    """Who may call admin RPCs, decided once for the process and applied by every admin method
    of every service (AdminService, Triton's RepositoryModelLoad/Unload) through `check`.

    - A token is configured: the call must carry `authorization: Bearer <token>`.
    - No token, the server listens on a loopback address only: admin is open (a local tool).
    - No token on any other address: every admin RPC is refused (PERMISSION_DENIED, saying how
      to set a token), unless `admin_insecure = true`, which logs a warning at start-up.

    Applied once, where the handlers are built (server/api/server.guarded wraps every
    AdminService method and the inference service's admin methods), so no method can forget
    it. Not a gRPC interceptor: grpc.aio runs an interceptor for every call, ModelInfer
    included, at a cost on the inference path.
    """

    def __init__(self, token: str, host: str, *, insecure: bool = False) -> None:
        self._token = token.encode()
        self._open = not token and (insecure or is_loopback(host))
        self._host = host
        if not token and insecure and not is_loopback(host):
            log.warning(
                "admin RPCs are open to any caller on %s (admin_insecure = true, no admin token)",
                host or "every address",
            )

    @property
    def refuses_all(self) -> bool:
        return not self._token and not self._open

    def allowed(self, metadata: Any) -> bool:
        if self._open:
            return True
        if not self._token:
            return False
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, given = value.partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    given.encode(), self._token
                )
        return False

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.allowed(context.invocation_metadata()):
            return
        if self._token:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin call needs metadata authorization: Bearer <token>",
            )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"admin RPCs are closed: no admin token is set and the server listens on "
            f"{self._host or 'every address'}; set BATCHLINE_ADMIN_TOKEN or [server] "
            "admin_token_file (or admin_insecure = true to open them without one)",
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
    """Reads answer from this worker's state; writes (ReloadModel, SetRoute) go through the
    control plane, which answers once every local worker has applied them."""

    def __init__(self, models: ModelManager, control: ControlPlane | None = None) -> None:
        self._models = models
        self._control = control

    async def ReloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if self._control is not None:
                outcome = await self._control.reload(request.model, request.ref or None)
            else:
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
        try:
            served = self._models.get(request.model)
        except ServingError as exc:
            await abort(context, exc)
        route = self._models.route(request.model) or Route(request.model, served.key.version)
        return _route_message(route)

    async def SetRoute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
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
            if self._control is not None:
                route = await self._control.set_route(request.model, route)
            else:
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
