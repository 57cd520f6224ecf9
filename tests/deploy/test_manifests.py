"""deploy/: every YAML parses; Kubernetes manifests validate (kubernetes-validate, strict); KServe
resources have the CRDs' shape; compose, Kubernetes and KServe all point at real things: files,
Dockerfile stages, `batchline` subcommands, config keys the real loader accepts, the server's
default ports."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.config import ServerSettings, Settings, load_settings
from tests.deploy.test_dockerfile import Stage, parse_dockerfile, stage_by_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
COMPOSE = DEPLOY / "compose.yaml"
# A current Kubernetes (native sidecars GA, gRPC probes GA, preStop sleep on by default).
K8S_VERSION = "1.33"
SERVER = ServerSettings()
try:
    from server.drift import DriftSettings

    DRIFT_PORTS = (DriftSettings().grpc_port, DriftSettings().http_port)
except ImportError:  # the drift sidecar's settings have not landed: ARCHITECTURE.md's ports
    DRIFT_PORTS = (8011, 8012)
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
# ServingRuntimeSpec's fields (kserve pkg/apis/serving/v1alpha1/servingruntime_types.go).
SERVING_RUNTIME_FIELDS = {
    "supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec",
    "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels", "annotations",
    "imagePullSecrets", "hostIPC", "grpcEndpoint", "grpcDataEndpoint", "httpDataEndpoint",
    "replicas", "storageHelper", "builtInAdapter",
}  # fmt: skip


# ---- helpers -------------------------------------------------------------------------------------


def load_yaml(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load_yaml(path)
        if doc.get("kind") != "Kustomization"
    ]


def resource(kind: str, directory: Path = K8S) -> dict[str, Any]:
    found = [d for p in sorted(directory.glob("*.yaml")) for d in load_yaml(p) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} under {directory}, found {len(found)}"
    return found[0]


def config_settings(tmp_path: Path) -> Settings:
    """The ConfigMap's batchline.toml through the real loader (unknown keys fail here)."""
    configmap = resource("ConfigMap")
    path = tmp_path / "batchline.toml"
    path.write_text(configmap["data"]["batchline.toml"])
    return load_settings(path)


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"the Deployment has no container {name!r}")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("server.cli.build_parser() has no subcommands")


def parse_batchline(argv: list[str], where: str) -> argparse.Namespace:
    """`argv` as the real CLI parses it; the message says which subcommand is missing."""
    assert argv[:1] == ["batchline"], f"{where}: {argv} does not run batchline"
    known = subcommands()
    hint = " (the drift sidecar, issue 8, registers it)" if argv[1] == "drift" else ""
    if argv[1] not in known:
        pytest.fail(
            f"{where}: `batchline {argv[1]}` is not registered in server.cli.build_parser() yet"
            f"{hint}; known: {', '.join(sorted(known))}"
        )
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: batchline rejects {shlex.join(argv)}")


def ports_of(c: dict[str, Any]) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in c.get("ports", [])}


# ---- every YAML; Kubernetes schemas --------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_yaml_under_deploy_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize(
    ("path", "doc"),
    k8s_resources(),
    ids=lambda v: v.name if isinstance(v, Path) else f"{v['kind']}/{v['metadata']['name']}",
)
def test_kubernetes_manifest_validates_strictly(path: Path, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


def test_strict_validation_rejects_an_unknown_field() -> None:
    """Guards the test above: the validator really is strict."""
    doc = resource("PodDisruptionBudget")
    doc["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# ---- the ConfigMap and the Deployment ------------------------------------------------------------


def test_configmap_toml_loads_and_equals_deploy_batchline_toml(tmp_path: Path) -> None:
    settings = config_settings(tmp_path)
    assert settings.models, "the ConfigMap serves no model"
    configmap = resource("ConfigMap")
    assert configmap["data"]["batchline.toml"] == (DEPLOY / "batchline.toml").read_text()
    load_settings(DEPLOY / "batchline.toml")


def test_server_container_exposes_the_configured_ports_with_grpc_probes(tmp_path: Path) -> None:
    settings = config_settings(tmp_path).server
    assert (settings.grpc_port, settings.metrics_port) == (SERVER.grpc_port, SERVER.metrics_port)
    server = container("server")
    assert ports_of(server) == {
        "grpc": settings.grpc_port,
        "http": settings.http_port,
        "metrics": settings.metrics_port,
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == settings.grpc_port, probe
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(server["resources"][kind]), kind


def test_termination_grace_outlasts_prestop_and_the_servers_drain(tmp_path: Path) -> None:
    settings = config_settings(tmp_path).server
    prestop = container("server")["lifecycle"]["preStop"]
    sleep_s = prestop["sleep"]["seconds"]
    assert sleep_s >= 3, "endpoints need a few seconds to drop the pod before SIGTERM"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > sleep_s + settings.grace_period_s + 2, (
        f"terminationGracePeriodSeconds {grace} <= preStop {sleep_s} s + drain "
        f"{settings.grace_period_s} s + stop margin"
    )
    liveness = container("server")["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.grace_period_s, (
        "a draining server (NOT_SERVING) must not fail liveness before the drain ends"
    )


def test_secrets_are_references_to_settings_the_loader_reads(tmp_path: Path) -> None:
    env = {e["name"]: e for e in container("server")["env"]}
    secret_vars = {"BATCHLINE_FEATURE_STORE", "BATCHLINE_ADMIN_TOKEN"}
    for name in secret_vars:
        assert "value" not in env[name], f"{name} holds a literal value; reference a Secret"
        assert env[name]["valueFrom"]["secretKeyRef"]["name"], name
        path = tmp_path / "batchline.toml"
        path.write_text(resource("ConfigMap")["data"]["batchline.toml"])
        sample = "redis://redis.example:6379/0"
        assert load_settings(path, env={name: sample}) != load_settings(path, env={}), (
            f"{name} is not read by server.config.load_settings"
        )
    # Admin is closed without a token on 0.0.0.0: a pod without the Secret must not start.
    assert not env["BATCHLINE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"].get("optional", False)


def test_volumes_line_up_with_the_config_path_and_the_registry(tmp_path: Path) -> None:
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    entrypoint = stages[-1].last("ENTRYPOINT")
    assert entrypoint is not None
    config_path = parse_batchline(entrypoint.exec_form(), "Dockerfile ENTRYPOINT").config
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"] + spec.get("initContainers", []):
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), f"{c['name']} mounts undeclared volumes"
        config_volume = volumes[mounts[str(Path(config_path).parent)]]
        assert config_volume["configMap"]["name"] == resource("ConfigMap")["metadata"]["name"]
        assert Path(config_path).name in resource("ConfigMap")["data"]
        registry = config_settings(tmp_path).server.registry
        assert registry in mounts, f"{c['name']} does not mount the registry at {registry}"


def test_service_hpa_and_pdb_select_the_deployments_pods() -> None:
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named_ports = ports_of(container("server"))
    services = [d for d in load_yaml(K8S / "service.yaml") if d["kind"] == "Service"]
    assert services
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert named_ports[port["targetPort"]] == port["port"], port
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    cpu = (
        kinds.get("ContainerResource", {}).get("containerResource") or kinds["Resource"]["resource"]
    )
    assert cpu["name"] == "cpu"
    if "container" in cpu:
        container(cpu["container"])
    assert "requests_per_second" in kinds["Pods"]["pods"]["metric"]["name"]
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["minReplicas"] > pdb["spec"].get("maxUnavailable", 0), (
        "a drain could take every replica at once"
    )


# ---- the drift sidecar (compose and Kubernetes) ---------------------------------------------------


def test_drift_sidecar_runs_batchline_drift_on_its_default_ports() -> None:
    sidecar = container("drift")
    assert sidecar.get("restartPolicy") == "Always", "run drift as a native sidecar"
    assert "readinessProbe" not in sidecar, "drift must never gate serving"
    # Only HTTP is a container port: the gRPC ingest listens on the pod's loopback.
    assert list(ports_of(sidecar).values()) == [DRIFT_PORTS[1]]
    compose = load_yaml(COMPOSE)[0]["services"]["drift"]
    for where, argv in (
        ("deploy/k8s drift container", sidecar["command"] + sidecar.get("args", [])),
        ("deploy/compose.yaml drift service", compose["entrypoint"] + compose.get("command", [])),
    ):
        args = parse_batchline(argv, where)
        assert args.config == "/etc/batchline/batchline.toml", where


@pytest.mark.parametrize("where", ["k8s", "compose"])
def test_drift_sidecar_binds_each_listener_explicitly_ingest_on_loopback(where: str) -> None:
    """gRPC ingest (records, labels) only for the server beside it; HTTP (metrics, report) for
    a scraper that comes over the pod or container IP. Given as flags, not left to defaults."""
    if where == "k8s":
        c = container("drift")
        argv = c["command"] + c.get("args", [])
    else:
        service = load_yaml(COMPOSE)[0]["services"]["drift"]
        argv = service["entrypoint"] + service.get("command", [])
    for flag in ("--host", "--http-host"):
        assert flag in argv, f"{where}: bind both listeners explicitly ({flag})"
    args = parse_batchline(argv, where)
    assert args.host == "127.0.0.1", f"{where}: the drift gRPC ingest must stay on loopback"
    assert args.http_host == "0.0.0.0", f"{where}: Prometheus scrapes the drift HTTP port"
    assert args.token_file is None, f"{where}: the token comes from the environment"


def test_drift_token_reaches_both_ends_from_the_same_secret_key() -> None:
    refs = {}
    for name in ("server", "drift"):
        env = {e["name"]: e for e in container(name).get("env", [])}
        var = env["BATCHLINE_DRIFT_TOKEN"]
        assert "value" not in var, f"{name}: BATCHLINE_DRIFT_TOKEN holds a literal value"
        refs[name] = var["valueFrom"]["secretKeyRef"]
    assert refs["server"] == refs["drift"]
    # Optional: without it the sidecar still binds loopback for ingest; with it, both ends use it.
    assert refs["drift"].get("optional") is True
    services = load_yaml(COMPOSE)[0]["services"]
    for name in ("batchline", "drift"):
        assert "BATCHLINE_DRIFT_TOKEN" in services[name].get("environment", {}), name


def test_drift_sidecar_liveness_probes_a_port_the_kubelet_can_reach() -> None:
    probe = container("drift")["livenessProbe"]
    for kind in ("tcpSocket", "grpc"):
        assert kind not in probe, "the drift gRPC port listens on loopback only"
    assert probe["httpGet"] == {"path": "/healthz", "port": DRIFT_PORTS[1]}


# ---- KServe ----------------------------------------------------------------------------------------


def test_cluster_serving_runtime_has_the_crd_shape_and_a_real_command() -> None:
    runtime = resource("ClusterServingRuntime", KSERVE)
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert set(spec) <= SERVING_RUNTIME_FIELDS, set(spec) - SERVING_RUNTIME_FIELDS
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["onnx"]["autoSelect"] is True
    assert set(spec["protocolVersions"]) <= KSERVE_PROTOCOLS
    assert {"v2", "grpc-v2"} & set(spec["protocolVersions"]), "batchline speaks V2"
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    assert c["ports"] == [{"containerPort": SERVER.grpc_port, "name": "h2c", "protocol": "TCP"}]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [c]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    args = parse_batchline(c["command"] + c.get("args", []), "ClusterServingRuntime")
    assert args.command == "serve"
    assert args.registry == "/mnt/models", "KServe's storage initializer downloads there"
    assert args.grpc_port == SERVER.grpc_port
    # REST is served too, on the port the REST InferenceService form names (Triton's 8000).
    assert args.http_port == SERVER.http_port == 8000
    assert "v2" in spec["protocolVersions"]
    assert "containerPort: 8000" in (KSERVE / "inferenceservice.yaml").read_text()
    assert len({args.grpc_port, args.http_port, args.metrics_port}) == 3
    assert str(args.metrics_port) == spec["annotations"]["prometheus.kserve.io/port"]
    name = resource("InferenceService", KSERVE)["metadata"]["name"]
    refs = tuple(ref.replace("{{.Name}}", name) for ref in args.model)
    settings = load_settings(None, server_overrides={"registry": "/mnt/models"}, model_refs=refs)
    assert [m.name for m in settings.models] == [name]


def test_inference_service_uses_the_runtime_for_onnx_over_grpc() -> None:
    runtime = resource("ClusterServingRuntime", KSERVE)
    isvc = resource("InferenceService", KSERVE)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


# ---- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE)
    return doc


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def service_argv(name: str, compose: dict[str, Any], stages: list[Stage]) -> list[str] | None:
    """What a service runs: its entrypoint/command, else its Dockerfile stage's ENTRYPOINT."""
    service = compose["services"][name]
    command = service.get("command", [])
    if "entrypoint" in service:
        return list(service["entrypoint"]) + list(command)
    built = {s["image"]: s["build"] for s in compose["services"].values() if "build" in s}
    build = service.get("build") or built.get(service.get("image", ""))
    if build is None:
        return None  # a third-party image
    entrypoint = stage_by_name(stages, build["target"]).last("ENTRYPOINT")
    assert entrypoint is not None, f"stage {build['target']} has no ENTRYPOINT"
    return entrypoint.exec_form() + list(command)


def test_compose_builds_stages_of_the_real_dockerfile(
    compose: dict[str, Any], stages: list[Stage]
) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            dockerfile = DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")
            assert dockerfile.resolve() == ROOT / "Dockerfile", name
            stage_by_name(stages, build["target"])


def test_compose_volumes_and_dependencies_refer_to_real_things(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named = set(compose.get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), f"{name}: depends on unknown services"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services, name
            assert "ports" not in service, f"{name}: publish its ports on the namespace's owner"


def test_compose_batchline_commands_are_real_subcommands_with_the_mounted_config(
    compose: dict[str, Any], stages: list[Stage]
) -> None:
    ran = 0
    for name in compose["services"]:
        argv = service_argv(name, compose, stages)
        if argv is None or argv[:2] == ["batchline", "drift"]:
            continue  # third-party images; drift has its own test above
        args = parse_batchline(argv, f"compose service {name}")
        ran += 1
        config = getattr(args, "config", None)
        if config:
            mounts = {
                v.split(":")[1]: v.split(":")[0] for v in compose["services"][name]["volumes"]
            }
            assert config in mounts, f"{name}: {config} is not mounted"
            load_settings(DEPLOY / mounts[config])
        if getattr(args, "registry", None):
            targets = [v.split(":")[1] for v in compose["services"][name]["volumes"]]
            assert args.registry in targets, f"{name}: the registry is not a volume"
    assert ran >= 2, "expected the models job and the server"


def test_compose_publishes_the_servers_and_the_sidecars_default_ports(
    compose: dict[str, Any],
) -> None:
    settings = load_settings(DEPLOY / "batchline.toml").server
    published = {
        int(str(p).split(":")[-1]) for p in compose["services"]["batchline"].get("ports", [])
    }
    assert {settings.grpc_port, settings.metrics_port} == {SERVER.grpc_port, SERVER.metrics_port}
    # The drift gRPC port listens on the namespace's loopback: publishing it would reach nothing.
    assert published == {
        settings.grpc_port,
        settings.http_port,
        settings.metrics_port,
        DRIFT_PORTS[1],
    }
    assert compose["services"]["drift"]["network_mode"] == "service:batchline"


def test_prometheus_scrapes_the_metrics_ports_of_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config = DEPLOY / mounts[config_arg.split("=", 1)[1]]
    (scrape,) = load_yaml(config)
    metrics_ports = {SERVER.metrics_port, DRIFT_PORTS[1]}
    scraped = set()
    for job in scrape["scrape_configs"]:
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, _, port = target.rpartition(":")
            if host == "localhost":
                continue
            assert host in services, f"{job['job_name']}: no compose service {host}"
            assert int(port) in metrics_ports, f"{job['job_name']}: {target} is no metrics port"
            scraped.add(int(port))
    assert scraped == metrics_ports


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    (datasources,) = load_yaml(provisioning / "datasources" / "prometheus.yaml")
    url = datasources["datasources"][0]["url"]
    host_port = url.removeprefix("http://").rstrip("/")
    host, _, port = host_port.partition(":")
    assert host in compose["services"], url
    published = {str(p).split(":")[-1] for p in compose["services"][host]["ports"]}
    assert port in published, url
    (dashboards,) = load_yaml(provisioning / "dashboards" / "batchline.yaml")
    path = dashboards["providers"][0]["options"]["path"]
    assert path in mounts, f"{path} is not mounted into grafana"
    assert mounts[path].is_dir(), f"{mounts[path]} is not a folder"
