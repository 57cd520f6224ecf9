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
from server.dataplane import DataPlane
from server.errors import ServingError
from server.models import ModelStatus
from server.net import is_loopback
from server.routing import Route

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

    def refusal(self, credential: str) -> tuple[bool, str]:
        """Why a call that `allowed` refused is refused: (a token is configured, the message).
        `credential` says where the token goes (gRPC metadata, an HTTP header)."""
        if self._token:
            return True, f"admin call needs {credential}"
        return False, (
            f"admin RPCs are closed: no admin token is set and the server listens on "
            f"{self._host or 'every address'}; set BATCHLINE_ADMIN_TOKEN or [server] "
            "admin_token_file (or admin_insecure = true to open them without one)"
        )

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.allowed(context.invocation_metadata()):
            return
        token_required, message = self.refusal("metadata authorization: Bearer <token>")
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED
            if token_required
            else grpc.StatusCode.PERMISSION_DENIED,
            message,
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


def model_state(status: ModelStatus) -> Any:
    mv = status.version_info
    return pb.ModelState(
        name=status.name,
        version=status.version,
        ref=status.ref,
        alias=status.alias,
        sha256=mv.sha256,
        state=status.state,
        last_error=status.last_error,
        loaded_at_unix_ms=status.loaded_at_ms,
        last_check_unix_ms=status.last_check_ms,
        metrics=dict(mv.metrics),
        tags=dict(mv.tags),
        source=mv.source,
        created=mv.created,
        execution=status.execution,
        reloads=status.reloads,
        failed_reloads=status.failed_reloads,
    )


class AdminServicer(pb_grpc.AdminServiceServicer):  # type: ignore[misc]
    """Reads answer from this worker's state; writes (ReloadModel, SetRoute) go through the
    data plane to the control plane, which answers once every local worker has applied them."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    async def ReloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            outcome = await self._plane.reload(request.model, request.ref or None)
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
            route = self._plane.route(request.model)
        except ServingError as exc:
            await abort(context, exc)
        return _route_message(route)

    async def SetRoute(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            route = await self._plane.set_route(
                request.model,
                primary=request.primary,
                canary=request.canary,
                canary_percent=request.canary_percent,
                shadows=[(s.version, s.sample_percent) for s in request.shadows],
            )
        except ServingError as exc:
            await abort(context, exc)
        return _route_message(route)

    async def ModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            chosen = self._plane.status(request.model)
        except ServingError as exc:
            await abort(context, exc)
        return pb.ModelStatusResponse(models=[model_state(s) for s in chosen])
