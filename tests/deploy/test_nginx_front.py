"""The shipped nginx front (deploy/nginx): a real nginx before a real server refuses calls over
its in-flight limit with RESOURCE_EXHAUSTED and a message, proxies the rest, and never loses one.

nginx is required (Debian's nginx-light; .ci/run installs it), like redis-server.
"""

from __future__ import annotations

import asyncio
import collections
import re
from pathlib import Path

import grpc
import numpy as np

from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import ROOT, nginx_binary, spawn_server, start_nginx
from tests.support.requests import infer_request

TEMPLATE = ROOT / "deploy" / "nginx" / "batchline.conf.template"


def test_the_template_names_only_the_four_documented_variables() -> None:
    assert nginx_binary(), "nginx is required for these tests (apt-get install nginx-light)"
    ours = set(re.findall(r"\$\{([A-Z_]+)\}", TEMPLATE.read_text()))
    assert ours == {"MAX_IN_FLIGHT", "LISTEN", "UPSTREAM", "RUNTIME"}


async def test_nginx_front_refuses_over_its_limit_with_resource_exhausted(
    demo_registry: Path, tmp_path: Path
) -> None:
    server = spawn_server(demo_registry, tmp_path, "--model", "churn_mlp@production")
    try:
        proxy = start_nginx(server.grpc_port, 2, tmp_path / "nginx")
    except BaseException:
        server.terminate()
        raise
    request = infer_request(np.zeros((64, 15), np.float32), "churn_mlp")
    statuses: collections.Counter[str] = collections.Counter()
    messages: set[str] = set()
    try:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            first = await stub.ModelInfer(request, timeout=30)
            assert len(first.outputs) == 2, "proxied to batchline and back"
            results = await asyncio.gather(
                *(stub.ModelInfer(request, timeout=60) for _ in range(200)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, grpc.aio.AioRpcError):
                    statuses[result.code().name] += 1
                    messages.add(result.details() or "")
                else:
                    statuses["OK"] += 1
            after = await stub.ModelInfer(request, timeout=30)
            assert len(after.outputs) == 2, "serving on after the burst"
    finally:
        proxy.stop()
        assert server.terminate() == 0
    assert sum(statuses.values()) == 200
    assert statuses["OK"] > 0
    assert statuses["RESOURCE_EXHAUSTED"] > 0, statuses
    assert set(statuses) == {"OK", "RESOURCE_EXHAUSTED"}, messages
    assert messages == {"batchline front: more than 2 requests in flight"}
