"""MlflowRegistry against a real `mlflow server` (sqlite store, proxied local artifacts).

One server per session: it starts while the demo models train, and the kill/restart test brings
it back on the same port. Every test registers under its own model name.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry_client import (
    AliasNotFound,
    AttachmentNotFound,
    ChecksumMismatch,
    FileRegistry,
    ManifestError,
    MlflowRegistry,
    ModelNotFound,
    ModelVersion,
    NothingToRollBack,
    Registry,
    RegistryError,
    RegistryUnavailable,
    VersionNotFound,
    rollback,
)
from registry_client.cli import main as registry_cli
from registry_client.http import HttpStatusError, JsonHttpClient
from registry_client.mlflow_registry import ALIAS_HISTORY_TAG, API, FILES_TAG, MANIFEST_TAG
from tests.support.models import register_again
from tests.support.processes import MlflowServer, free_port
from tests.support.requests import infer_request


@pytest.fixture(scope="session")
def mlflow_launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The server process, started but maybe not ready (it boots while other fixtures work)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.launch()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_launched: MlflowServer, demo_registry: Path) -> MlflowServer:
    # Depending on demo_registry here makes the (slow) demo training overlap the server's boot.
    mlflow_launched.wait_ready()
    return mlflow_launched


@pytest.fixture
def registry(mlflow_server: MlflowServer, tmp_path: Path) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server.url, cache_dir=tmp_path / "cache", retries=1)


@pytest.fixture
def demo(demo_registry: Path) -> FileRegistry:
    return FileRegistry(demo_registry)


@pytest.fixture
def name() -> str:
    return f"churn-{uuid.uuid4().hex[:8]}"


def copy_in(registry: Registry, name: str, mv: ModelVersion) -> ModelVersion:
    """Register a demo version (its bytes and metadata) under `name`."""
    return register_again(registry, name, mv, Path(mv.artifact))


def rest(server: MlflowServer) -> JsonHttpClient:
    return JsonHttpClient(server.url, retries=0)


def test_register_the_demo_model_then_resolve_by_alias_version_and_stage(
    registry: MlflowRegistry, demo: FileRegistry, mlflow_server: MlflowServer, name: str
) -> None:
    v1 = demo.get_version("churn", "1")
    mv = copy_in(registry, name, v1)
    assert (mv.name, mv.version) == (name, "1")
    assert (mv.sha256, mv.signature, mv.metrics) == (v1.sha256, v1.signature, v1.metrics)
    assert (mv.tags, mv.features, mv.source) == (v1.tags, v1.features, v1.source)
    assert mv.description == v1.description
    assert mv.artifact.startswith("mlflow-artifacts:/batchline-registry/")
    assert mv.artifact.endswith("/model/model.onnx")
    assert mv.created.endswith("Z")
    assert name in registry.list_models()
    assert registry.list_versions(name) == [mv]

    registry.set_alias(name, "production", "1")
    assert registry.aliases(name) == {"production": "1"}
    assert registry.resolve(f"{name}@production") == mv
    assert registry.resolve(name) == mv
    assert registry.resolve(f"{name}@1") == mv

    # No `staging` alias: the deprecated stage answers instead, until an alias is set.
    v2 = copy_in(registry, name, demo.get_version("churn", "2"))
    with pytest.raises(AliasNotFound):
        registry.resolve(f"{name}@staging")
    rest(mlflow_server).post(
        f"{API}/model-versions/transition-stage",
        {"name": name, "version": "2", "stage": "Staging", "archive_existing_versions": False},
    )
    assert registry.resolve(f"{name}@Staging") == v2
    registry.set_alias(name, "staging", "1")
    assert registry.resolve(f"{name}@staging") == mv


def test_fetch_caches_the_artifact_and_verifies_its_sha256(
    registry: MlflowRegistry, demo: FileRegistry, mlflow_server: MlflowServer, name: str
) -> None:
    v1 = demo.get_version("churn", "1")
    mv = copy_in(registry, name, v1)
    path = registry.fetch(mv)
    assert path == registry.cache_dir / name / "1" / "model.onnx"
    assert path.read_bytes() == Path(v1.artifact).read_bytes()
    assert registry.fetch(mv) == path

    # A corrupt cached copy is never returned: it is downloaded again.
    path.write_bytes(b"corrupt")
    assert registry.fetch(mv).read_bytes() == Path(v1.artifact).read_bytes()

    # A corrupt copy on the server is refused, and leaves nothing in the cache.
    stored = mlflow_server.root / "artifacts" / mv.artifact.removeprefix("mlflow-artifacts:/")
    stored.write_bytes(b"tampered with on the server")
    path.unlink()
    with pytest.raises(ChecksumMismatch, match=mv.artifact):
        registry.fetch(mv)
    assert list(path.parent.iterdir()) == []


def test_fetch_follows_a_runs_uri_source_through_the_server(
    registry: MlflowRegistry, demo: FileRegistry, mlflow_server: MlflowServer, name: str
) -> None:
    """A version registered outside batchline with a runs:/ source still downloads."""
    v1 = demo.get_version("churn", "1")
    copy_in(registry, name, v1)
    client = rest(mlflow_server)
    record = client.get(f"{API}/model-versions/get", {"name": name, "version": "1"})
    run_id = record["model_version"]["run_id"]
    client.post(
        f"{API}/model-versions/create",
        {
            "name": name,
            "source": f"runs:/{run_id}/model",
            "run_id": run_id,
            "tags": [{"key": "sha256", "value": v1.sha256}],
        },
    )
    mv = registry.get_version(name, "2")
    assert mv.artifact == f"runs:/{run_id}/model/model.onnx"
    assert (mv.source, mv.signature.inputs) == (f"runs:/{run_id}", ())
    assert registry.fetch(mv).read_bytes() == Path(v1.artifact).read_bytes()


def test_fetch_reads_a_store_only_the_server_can_see_through_the_server(
    registry: MlflowRegistry, demo: FileRegistry, mlflow_server: MlflowServer, name: str
) -> None:
    """A version whose artifacts sit in a plain folder on the server (as with
    --default-artifact-root) downloads through the server's model-version artifact route."""
    v1 = demo.get_version("churn", "1")
    client = rest(mlflow_server)
    folder = mlflow_server.root / f"local-{name}"
    experiment = client.post(
        f"{API}/experiments/create", {"name": f"local-{name}", "artifact_location": folder.as_uri()}
    )
    run = client.post(f"{API}/runs/create", {"experiment_id": experiment["experiment_id"]})
    root = run["run"]["info"]["artifact_uri"]
    assert root.startswith("file://")
    model_dir = Path(urllib.parse.urlsplit(root).path) / "model"
    model_dir.mkdir(parents=True)
    shutil.copyfile(v1.artifact, model_dir / "model.onnx")
    client.post(f"{API}/registered-models/create", {"name": name})
    client.post(
        f"{API}/model-versions/create",
        {
            "name": name,
            "source": f"{root}/model",
            "run_id": run["run"]["info"]["run_id"],
            "tags": [{"key": "sha256", "value": v1.sha256}],
        },
    )
    mv = registry.get_version(name, "1")
    assert mv.artifact == f"{root}/model/model.onnx"
    assert registry.fetch(mv).read_bytes() == Path(v1.artifact).read_bytes()


def test_moving_the_alias_keeps_history_and_rollback_returns_the_previous_version(
    registry: MlflowRegistry, demo: FileRegistry, mlflow_server: MlflowServer, name: str
) -> None:
    for version in ("1", "2"):
        copy_in(registry, name, demo.get_version("churn", version))
    registry.set_alias(name, "production", "1")
    with pytest.raises(NothingToRollBack, match="'production'"):
        rollback(registry, name)
    registry.set_alias(name, "production", "2")
    registry.set_alias(name, "production", "2")  # a no-op set is not a move
    assert [v for v, _ in registry.alias_history(name, "production")] == ["1", "2"]

    assert rollback(registry, name) == "1"
    assert registry.resolve(f"{name}@production").version == "1"
    assert [v for v, _ in registry.alias_history(name, "production")] == ["1", "2", "1"]

    # The history is a registered-model tag anyone can read in MLflow.
    model = rest(mlflow_server).get(f"{API}/registered-models/get", {"name": name})
    tags = {t["key"]: t["value"] for t in model["registered_model"]["tags"]}
    history = json.loads(tags[ALIAS_HISTORY_TAG + "production"])
    assert [h["version"] for h in history] == ["1", "2", "1"]
    assert all(h["at"].endswith("Z") for h in history)

    # A move made outside batchline (the MLflow UI, say) is noticed, with no time.
    rest(mlflow_server).post(
        f"{API}/registered-models/alias", {"name": name, "alias": "production", "version": "2"}
    )
    assert registry.alias_history(name, "production")[-1] == ("2", "")
    assert rollback(registry, name) == "1"


def test_unknown_model_alias_and_version_errors_name_them(
    registry: MlflowRegistry, demo: FileRegistry, name: str
) -> None:
    missing = f"{name}-missing"
    for call in (
        lambda: registry.resolve(f"{missing}@production"),
        lambda: registry.resolve(f"{missing}@3"),
        lambda: registry.list_versions(missing),
        lambda: registry.aliases(missing),
        lambda: registry.set_alias(missing, "production", "1"),
    ):
        with pytest.raises(ModelNotFound, match=missing):
            call()
    copy_in(registry, name, demo.get_version("churn", "1"))
    with pytest.raises(VersionNotFound, match=rf"{name}.*'9'.*registered: 1"):
        registry.resolve(f"{name}@9")
    with pytest.raises(VersionNotFound, match="'9'"):
        registry.set_alias(name, "production", "9")
    with pytest.raises(AliasNotFound, match=rf"{name}.*'canary'"):
        registry.resolve(f"{name}@canary")
    with pytest.raises(AliasNotFound, match="'canary'"):
        registry.alias_history(name, "canary")


def test_mlflow_killed_is_unavailable_then_the_same_client_recovers_on_restart(
    mlflow_server: MlflowServer, demo: FileRegistry, tmp_path: Path, name: str
) -> None:
    sleeps: list[float] = []
    registry = MlflowRegistry(
        mlflow_server.url, cache_dir=tmp_path / "cache", retries=2, sleep=sleeps.append
    )
    mv = copy_in(registry, name, demo.get_version("churn", "1"))
    registry.set_alias(name, "production", "1")
    cached = registry.fetch(mv)

    mlflow_server.kill()
    try:
        with pytest.raises(RegistryUnavailable, match=mlflow_server.url) as exc:
            registry.resolve(f"{name}@production")
        assert "connection refused" in str(exc.value)
        assert sleeps == [0.1, 0.2]  # the default schedule: 0.1 s, doubling
        # A verified artifact in the cache needs no server.
        assert registry.fetch(mv) == cached
    finally:
        mlflow_server.launch()
        mlflow_server.wait_ready()
    assert registry.resolve(f"{name}@production") == mv
    registry.set_alias(name, "canary", "1")
    assert registry.aliases(name) == {"production": "1", "canary": "1"}


def test_cli_round_trip_against_mlflow(
    mlflow_server: MlflowServer,
    demo: FileRegistry,
    name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = f"mlflow+{mlflow_server.url}"
    artifact = demo.get_version("churn", "1").artifact

    def cli(*argv: str) -> str:
        capsys.readouterr()
        code = registry_cli(["registry", *argv, "--registry", spec])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = cli("register", name, artifact, "--metric", "auc=0.9", "--alias", "production")
    assert out.startswith(f"registered {name} version 1 ")
    cli("register", name, artifact)
    assert cli("promote", name, "2").splitlines()[0] == f"{name}@production: 1 -> 2"
    listed = {m["name"]: m for m in json.loads(cli("list", "--json"))}
    assert listed[name] == {"name": name, "versions": ["1", "2"], "aliases": {"production": "2"}}
    assert cli("rollback", name).strip() == f"{name}@production: rolled back 2 -> 1"
    shown = json.loads(cli("show", name, "--json"))
    assert shown["aliases"] == {"production": "1"}
    assert shown["versions"][0]["signature"]["inputs"][0]["shape"] == [-1, 15]
    assert shown["versions"][0]["metrics"] == {"auc": 0.9}

    capsys.readouterr()
    assert registry_cli(["registry", "show", f"{name}-x", "--registry", spec]) == 1
    assert f"{name}-x" in capsys.readouterr().err


# -- the HTTP client's failure handling, against small real servers ------------------------------


def test_refused_connection_is_retried_then_unavailable_naming_the_url() -> None:
    port = free_port()  # nothing listens there now
    sleeps: list[float] = []
    client = JsonHttpClient(f"http://127.0.0.1:{port}", retries=3, sleep=sleeps.append)
    with pytest.raises(RegistryUnavailable, match=f"http://127.0.0.1:{port}") as exc:
        client.post("/x", {}, idempotent=False)  # refused: never sent, so safe to resend
    assert "after 4 attempts: connection refused" in str(exc.value)
    assert sleeps == [0.1, 0.2, 0.4]


class _Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body, delay[, declared length]) of the
    server's script; a declared length past the body's is a body cut short (then the
    connection closes). Request bodies are kept in `received`."""

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        server: ScriptedServer = self.server  # type: ignore[assignment]
        server.received.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        status, body, delay, *declared = (
            server.script.pop(0) if server.script else (200, b"{}", 0.0)
        )
        server.hits += 1
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(declared[0] if declared else len(body)))
            self.end_headers()
            self.wfile.write(body)
            if declared:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left, as the timeout test intends

    def log_message(self, format: str, *args: object) -> None:
        pass


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True
    script: list[tuple[int, bytes, float] | tuple[int, bytes, float, int]]
    received: list[bytes]
    hits: int = 0


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer(("127.0.0.1", 0), _Scripted)
    server.script = []
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_5xx_is_retried_and_a_later_success_returned(scripted: ScriptedServer) -> None:
    scripted.script = [(503, b"{}", 0.0), (500, b'{"error_code": "INTERNAL_ERROR"}', 0.0)]
    client = JsonHttpClient(f"http://127.0.0.1:{scripted.server_port}", sleep=lambda _s: None)
    assert client.get("/ok") == {}
    assert scripted.hits == 3


def test_a_timeout_is_not_retried_for_a_non_idempotent_post(scripted: ScriptedServer) -> None:
    scripted.script = [(200, b"{}", 1.0)]
    url = f"http://127.0.0.1:{scripted.server_port}"
    client = JsonHttpClient(url, timeout_s=0.2, sleep=lambda _s: None)
    with pytest.raises(RegistryUnavailable, match=rf"{url}.*after 1 attempt: timed out"):
        client.post("/create", {"name": "x"})
    assert scripted.hits == 1


def test_a_4xx_is_raised_at_once_with_the_servers_error_code(scripted: ScriptedServer) -> None:
    body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such thing"}'
    scripted.script = [(404, body, 0.0)]
    client = JsonHttpClient(f"http://127.0.0.1:{scripted.server_port}", sleep=lambda _s: None)
    with pytest.raises(HttpStatusError) as exc:
        client.get("/thing", {"name": "a b"})
    assert (exc.value.status, exc.value.error_code) == (404, "RESOURCE_DOES_NOT_EXIST")
    assert "/thing?name=a+b" in str(exc.value)
    assert "no such thing" in str(exc.value)
    assert scripted.hits == 1


def test_429_is_retried_for_a_get(scripted: ScriptedServer) -> None:
    scripted.script = [(429, b'{"error_code": "REQUEST_LIMIT_EXCEEDED"}', 0.0)]
    sleeps: list[float] = []
    client = JsonHttpClient(f"http://127.0.0.1:{scripted.server_port}", sleep=sleeps.append)
    assert client.get("/ok") == {}
    assert (scripted.hits, sleeps) == (2, [0.1])


def test_a_5xx_to_a_non_idempotent_post_is_not_retried(scripted: ScriptedServer) -> None:
    scripted.script = [(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', 0.0)]
    url = f"http://127.0.0.1:{scripted.server_port}"
    client = JsonHttpClient(url, sleep=lambda _s: None)
    with pytest.raises(RegistryUnavailable, match=r"after 1 attempt: HTTP 503 TEMPORARILY"):
        client.post("/runs/create", {"name": "x"})
    assert scripted.hits == 1


def test_5xx_spent_retries_are_unavailable_naming_status_and_attempts(
    scripted: ScriptedServer,
) -> None:
    scripted.script = [(502, b"bad gateway", 0.0)] * 3
    url = f"http://127.0.0.1:{scripted.server_port}"
    client = JsonHttpClient(url, retries=2, sleep=lambda _s: None)
    with pytest.raises(
        RegistryUnavailable, match=rf"{url}.*GET /x failed after 3 attempts: HTTP 502"
    ):
        client.get("/x")
    assert scripted.hits == 3


def test_a_download_cut_short_is_fetched_again_from_the_start(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    whole = bytes(range(256)) * 4096  # 1 MiB
    scripted.script = [(200, whole[:1000], 0.0, len(whole)), (200, whole, 0.0)]
    client = JsonHttpClient(f"http://127.0.0.1:{scripted.server_port}", sleep=lambda _s: None)
    with (tmp_path / "out").open("w+b") as sink:
        client.download("/artifact", sink)
    assert (tmp_path / "out").read_bytes() == whole
    assert scripted.hits == 2


def test_an_upload_answered_503_is_sent_again_whole(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"onnx" * 100_000)
    scripted.script = [(503, b"{}", 0.0)]
    client = JsonHttpClient(f"http://127.0.0.1:{scripted.server_port}", sleep=lambda _s: None)
    client.put_file("/artifacts/model.onnx", source)
    assert scripted.received == [source.read_bytes()] * 2


def test_a_non_json_answer_names_the_server(scripted: ScriptedServer) -> None:
    scripted.script = [(200, b"<html>not mlflow</html>", 0.0)]
    url = f"http://127.0.0.1:{scripted.server_port}"
    client = JsonHttpClient(url, sleep=lambda _s: None)
    with pytest.raises(RegistryError, match=rf"something other than a JSON object.*is {url} the"):
        client.get("/api")


async def test_server_serves_from_mlflow_and_follows_an_alias_move_under_load(
    start_app: Any, registry: MlflowRegistry, demo: FileRegistry, name: str, tmp_path: Path
) -> None:
    """The seed's flow end to end: register in MLflow, serve name@production, move the alias."""
    import asyncio

    import grpc
    import numpy as np

    from server._proto import inference_pb2_grpc as pb_grpc

    first = copy_in(registry, name, demo.get_version("churn", "1"))
    second = copy_in(registry, name, demo.get_version("churn", "2"))
    registry.set_alias(name, "production", first.version)
    app = await start_app(
        models=(f"{name}@production",),
        registry="mlflow+" + registry.base_url,
        server={"registry_cache_dir": str(tmp_path / "server-cache")},
    )
    request = infer_request(np.zeros((1, 15), np.float32), name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ModelInfer(request, timeout=10)).model_version == first.version
        done = asyncio.Event()
        seen: list[str] = []

        async def client() -> None:
            while not done.is_set():
                seen.append((await stub.ModelInfer(request, timeout=10)).model_version)

        load = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.to_thread(registry.set_alias, name, "production", second.version)
        outcome = await app.models.reload(name)
        after = await stub.ModelInfer(request, timeout=10)
        done.set()
        await asyncio.gather(*load)  # any failed request would raise here
    assert (outcome.previous_version, outcome.version) == (first.version, second.version)
    assert after.model_version == second.version
    assert first.version in seen


# -- the manifest: every file of a version, uploaded and verified --------------------------------


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stored_folder(server: MlflowServer, mv: ModelVersion) -> Path:
    """Where the server keeps the version's model/ folder (its artifacts destination)."""
    return (server.root / "artifacts" / mv.artifact.removeprefix("mlflow-artifacts:/")).parent


def test_register_uploads_external_data_and_attachments_and_fetch_verifies_each(
    registry: MlflowRegistry,
    demo: FileRegistry,
    mlflow_server: MlflowServer,
    name: str,
    tmp_path: Path,
) -> None:
    import numpy as np
    import onnxruntime as ort

    from registry_client.demo import load_holdout
    from tests.support.models import tamper_in_place, with_external_data

    v1 = demo.get_version("churn_mlp", "1")
    src = with_external_data(demo.fetch(v1), tmp_path / "src")
    attachments = {
        f: demo.attachment("churn_mlp", "1", f) for f in ("feature_view.json", "profile.json")
    }
    mv = registry.register(
        name, src, signature=v1.signature, features=v1.features, attachments=attachments
    )
    expected = {
        "model.onnx": _sha(src),
        "weights.bin": _sha(src.parent / "weights.bin"),
        **{f: _sha(p) for f, p in attachments.items()},
    }
    assert (mv.files, mv.external_data) == (expected, ("weights.bin",))
    assert registry.get_version(name, "1") == mv
    record = rest(mlflow_server).get(f"{API}/model-versions/get", {"name": name, "version": "1"})
    tags = {t["key"]: t["value"] for t in record["model_version"]["tags"]}
    assert json.loads(tags[FILES_TAG]) == expected
    assert tags[MANIFEST_TAG] == mv.manifest_sha256

    path = registry.fetch(mv)
    folder = path.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    x = load_holdout(demo.root, "churn_mlp", "1").X[:32]

    def probabilities(model: Path) -> Any:
        return ort.InferenceSession(str(model)).run(["probabilities"], {"input": x})[0]

    np.testing.assert_array_equal(probabilities(path), probabilities(Path(v1.artifact)))
    view = registry.attachment(name, "1", "feature_view.json")
    assert view.read_bytes() == attachments["feature_view.json"].read_bytes()

    # The cache is held to the manifest too: a changed copy is downloaded again, a planted
    # file removed.
    tamper_in_place(folder / "weights.bin")
    (folder / "extra.bin").write_bytes(b"planted")
    assert registry.fetch(mv) == path
    assert _sha(folder / "weights.bin") == expected["weights.bin"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)

    # Changed on the server: refused, naming the file, and nothing of it cached.
    stored = _stored_folder(mlflow_server, mv)
    tamper_in_place(stored / "weights.bin")
    (folder / "weights.bin").unlink()
    with pytest.raises(ChecksumMismatch, match=r"model/weights\.bin .*restore it there"):
        registry.fetch(mv)
    assert not (folder / "weights.bin").exists()
    (stored / "feature_view.json").write_text("{}\n")
    fresh = MlflowRegistry(mlflow_server.url, cache_dir=tmp_path / "other-cache", retries=1)
    with pytest.raises(ChecksumMismatch, match=r"model/feature_view\.json"):
        fresh.attachment(name, "1", "feature_view.json")
    with pytest.raises(AttachmentNotFound, match=r"'holdout.npz' \(attachments: feature_view"):
        fresh.attachment(name, "1", "holdout.npz")


def test_a_version_without_a_manifest_that_needs_external_data_is_refused(
    registry: MlflowRegistry,
    demo: FileRegistry,
    mlflow_server: MlflowServer,
    name: str,
    tmp_path: Path,
) -> None:
    """Created outside batchline with only a sha256 tag: model.onnx alone is verified, so a
    graph that reads weights from another file is refused rather than loaded unchecked."""
    from tests.support.models import with_external_data

    v1 = demo.get_version("churn_mlp", "1")
    src = with_external_data(demo.fetch(v1), tmp_path / "src")
    registry.register(name, src, signature=v1.signature)
    client = rest(mlflow_server)
    run_id = client.get(f"{API}/model-versions/get", {"name": name, "version": "1"})[
        "model_version"
    ]["run_id"]
    client.post(
        f"{API}/model-versions/create",
        {
            "name": name,
            "source": f"runs:/{run_id}/model",
            "run_id": run_id,
            "tags": [{"key": "sha256", "value": _sha(src)}],
        },
    )
    legacy = registry.get_version(name, "2")
    assert legacy.files == {}
    with pytest.raises(ManifestError, match=r"'weights\.bin'.*without a batchline manifest"):
        registry.fetch(legacy)


async def test_the_server_refuses_a_version_tampered_on_mlflow_and_keeps_serving(
    start_app: Any,
    registry: MlflowRegistry,
    demo: FileRegistry,
    mlflow_server: MlflowServer,
    name: str,
    tmp_path: Path,
) -> None:
    import grpc
    import numpy as np

    from server._proto import inference_pb2_grpc as pb_grpc
    from server.errors import FailedPrecondition
    from tests.support.models import tamper_in_place, with_external_data

    v1 = demo.get_version("churn_mlp", "1")
    copy_in(registry, name, v1)
    src = with_external_data(demo.fetch(v1), tmp_path / "src")
    second = registry.register(name, src, signature=v1.signature, features=v1.features)
    tamper_in_place(_stored_folder(mlflow_server, second) / "weights.bin")
    app = await start_app(
        models=(f"{name}@1",),
        registry="mlflow+" + registry.base_url,
        server={"registry_cache_dir": str(tmp_path / "server-cache")},
    )
    with pytest.raises(FailedPrecondition, match=r"model/weights\.bin .*sha256"):
        await app.models.reload(name, f"{name}@2")
    request = infer_request(np.zeros((1, 15), np.float32), name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert reply.model_version == "1"
