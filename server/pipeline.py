"""The use case: a validated request -> its model version's batcher -> the outputs it asked for.

Later stages (routing, features, breaker, mirroring, drift) plug in here; transport stays in
server/api and knows nothing of them.
"""

from __future__ import annotations

import asyncio

from server.clock import Clock
from server.errors import ServingError, Unavailable
from server.models import ModelManager, ServedModel
from server.types import InferRequest, InferResult


class InferencePipeline:
    """Runs requests against served models; records each request's outcome and latency."""

    def __init__(self, models: ModelManager, clock: Clock) -> None:
        self.models = models
        self._clock = clock
        self._accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def accepting(self) -> bool:
        return self._accepting

    def resolve(self, name: str, version: str | None) -> ServedModel:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        return self.models.get(name, version)

    async def infer(self, served: ServedModel, request: InferRequest) -> InferResult:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        start = self._clock.now()
        self._in_flight += 1
        self._idle.clear()
        status = "OK"
        try:
            outputs = await served.batcher.submit(request.inputs, request.rows, request.deadline)
            index = served.output_index
            if request.outputs is None:
                selected = dict(zip(index, outputs, strict=True))
            else:
                selected = {name: outputs[index[name]] for name in request.outputs}
            return InferResult(
                model=served.key.name,
                version=served.key.version,
                id=request.id,
                outputs=selected,
                raw_output=request.raw_output,
            )
        except ServingError as exc:
            status = exc.kind.name
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except BaseException:
            status = "INTERNAL"
            raise
        finally:
            served.observer.request_done(self._clock.now() - start, status)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self) -> None:
        """Wait until every accepted request has its answer."""
        await self._idle.wait()
