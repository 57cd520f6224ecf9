"""TLS and mutual TLS on the gRPC port, with certificates made by the test (openssl)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory

ROOT = Path(__file__).resolve().parents[2]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=batchline test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d


def _credentials(pki: Path, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "client.key").read_bytes() if client_cert else None,
        (pki / "client.pem").read_bytes() if client_cert else None,
    )


async def _ready(channel: grpc.aio.Channel) -> bool:
    reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
        pb.ServerReadyRequest(), timeout=5
    )
    return bool(reply.ready)


async def test_tls_port_serves_tls_clients_and_refuses_plaintext(
    start_app: AppFactory, pki: Path
) -> None:
    app = await start_app(
        models=("churn@production",),
        server={"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")},
    )
    address = f"127.0.0.1:{app.grpc_port}"
    async with grpc.aio.secure_channel(address, _credentials(pki, client_cert=False)) as channel:
        assert await _ready(channel)
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _ready(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(
    start_app: AppFactory, pki: Path
) -> None:
    app = await start_app(
        models=("churn@production",),
        server={
            "tls_cert": str(pki / "server.pem"),
            "tls_key": str(pki / "server.key"),
            "tls_ca": str(pki / "ca.pem"),
        },
    )
    address = f"127.0.0.1:{app.grpc_port}"
    async with grpc.aio.secure_channel(address, _credentials(pki, client_cert=True)) as channel:
        assert await _ready(channel)
    async with grpc.aio.secure_channel(address, _credentials(pki, client_cert=False)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _ready(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_command_speaks_mutual_tls(start_app: AppFactory, pki: Path) -> None:
    app = await start_app(
        models=("churn@production",),
        server={
            "tls_cert": str(pki / "server.pem"),
            "tls_key": str(pki / "server.key"),
            "tls_ca": str(pki / "ca.pem"),
        },
    )
    import asyncio

    base = [sys.executable, "-m", "server.cli", "health", "--address", f"127.0.0.1:{app.grpc_port}"]
    tls = [
        "--tls-ca",
        str(pki / "ca.pem"),
        "--tls-cert",
        str(pki / "client.pem"),
        "--tls-key",
        str(pki / "client.key"),
    ]

    async def run(args: list[str]) -> int:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await proc.wait()

    assert await run(base + tls) == 0
    assert await run(base) == 1


def test_tls_settings_must_come_in_pairs_and_name_the_key(tmp_path: Path) -> None:
    from server.config import load_settings
    from server.errors import ConfigError

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="tls_key"):
        load_settings(server_overrides={"tls_cert": str(cert)})
    with pytest.raises(ConfigError, match=r"server\.tls_ca"):
        load_settings(
            server_overrides={
                "tls_cert": str(cert),
                "tls_key": str(cert),
                "tls_ca": str(tmp_path / "missing.pem"),
            }
        )
