"""deploy/k8s/front: the base plus an nginx front in each pod, as kustomize would build it.

kustomize is not installed here, so the overlay's JSON 6902 patches are applied by a small
implementation of the two operations it uses (add, replace) to the base manifests; the result
must validate strictly and be wired together: the Services reach nginx, nginx reaches the
server's gRPC port, the template nginx renders is the shipped one and takes exactly the variables
the container sets.
"""

from __future__ import annotations

import copy
import re
import shlex
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_manifests import K8S, K8S_VERSION, load_yaml

FRONT = K8S / "front"
TEMPLATE = K8S.parent / "nginx" / "batchline.conf.template"


def _apply(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 `add` (with "-" for appending to a list) and `replace`, nothing else."""
    out = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")
        ]
        target: Any = out
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "add" and isinstance(target, list):
            if last == "-":
                target.append(op["value"])
            else:
                target.insert(int(last), op["value"])
        elif op["op"] in ("add", "replace"):
            if isinstance(target, list):
                target[int(last)] = op["value"]
            else:
                assert op["op"] == "add" or last in target, f"replace of a missing {op['path']}"
                target[last] = op["value"]
        else:
            pytest.fail(f"unsupported patch operation {op['op']}")
    return out


def built() -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay's output: base resources with the overlay's patches, by (kind, name)."""
    (kustomization,) = load_yaml(FRONT / "kustomization.yaml")
    assert kustomization["resources"] == ["../"]
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for path in sorted(K8S.glob("*.yaml"))
        for d in load_yaml(path)
        if d["kind"] != "Kustomization"
    }
    for patch in kustomization["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        assert key in docs, f"the patch targets {key}, which the base does not have"
        docs[key] = _apply(docs[key], yaml.safe_load(patch["patch"]))
    return docs


def _containers(docs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    spec = docs[("Deployment", "batchline")]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def test_the_overlays_template_is_the_shipped_one() -> None:
    assert (FRONT / "batchline.conf.template").read_bytes() == TEMPLATE.read_bytes()


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "batchline"), ("Service", "batchline"),
                       ("Service", "batchline-headless")],
)  # fmt: skip
def test_patched_resources_validate_strictly(kind: str, name: str) -> None:
    doc = built()[(kind, name)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{kind}/{name} {'/'.join(map(str, exc.path))}: {exc.message}")


def test_services_reach_nginx_and_nginx_reaches_the_servers_grpc_port() -> None:
    docs = built()
    containers = _containers(docs)
    nginx, server = containers["nginx"], containers["server"]
    env = {e["name"]: e["value"] for e in nginx["env"]}
    front_ports = {p["name"]: p["containerPort"] for p in nginx["ports"]}
    server_ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    for name in ("batchline", "batchline-headless"):
        grpc = next(p for p in docs[("Service", name)]["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["targetPort"] == "grpc-front"
    assert env["LISTEN"].endswith(f":{front_ports['grpc-front']}")
    assert env["UPSTREAM"] == f"127.0.0.1:{server_ports['grpc']}"
    # The server's own probes stay on its port: nginx never decides whether the server is ready.
    assert server["readinessProbe"]["grpc"]["port"] == server_ports["grpc"]
    assert int(env["MAX_IN_FLIGHT"]) >= 1


def test_no_two_containers_of_the_pod_listen_on_one_port() -> None:
    """The pod's containers share one network namespace: nginx's front port must be none of
    the server's (gRPC, REST, metrics) nor the drift sidecar's."""
    spec = built()[("Deployment", "batchline")]["spec"]["template"]["spec"]
    ports = [
        p["containerPort"]
        for c in [*spec["containers"], *spec.get("initContainers", [])]
        for p in c.get("ports", [])
    ]
    assert len(ports) == len(set(ports)), sorted(ports)
    nginx = _containers(built())["nginx"]
    listen = int(env_value(nginx, "LISTEN").rsplit(":", 1)[1])
    assert ports.count(listen) == 1
    assert nginx["readinessProbe"]["tcpSocket"]["port"] == listen


def test_nginx_renders_the_mounted_template_with_exactly_its_variables() -> None:
    docs = built()
    nginx = _containers(docs)["nginx"]
    script = " ".join(nginx["args"])
    variables = set(re.findall(r"\$\{([A-Z_]+)\}", TEMPLATE.read_text()))
    words = shlex.split(script)
    assert words[0] == "envsubst"
    assert set(re.findall(r"\$([A-Z_]+)", words[1])) == variables
    assert {e["name"] for e in nginx["env"]} == variables
    mounts = {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}
    assert f"{mounts['nginx-template']}/batchline.conf.template" in script
    volumes = docs[("Deployment", "batchline")]["spec"]["template"]["spec"]["volumes"]
    template_volume = next(v for v in volumes if v["name"] == "nginx-template")
    (kustomization,) = load_yaml(FRONT / "kustomization.yaml")
    (generator,) = kustomization["configMapGenerator"]
    assert template_volume["configMap"]["name"] == generator["name"]
    assert generator["files"] == ["batchline.conf.template"]
    # Everything nginx writes goes to its own emptyDir (the root filesystem is read-only).
    assert env_value(nginx, "RUNTIME") == mounts["nginx-tmp"]
    assert nginx["securityContext"]["readOnlyRootFilesystem"] is True


def env_value(container: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in container["env"] if e["name"] == name))
