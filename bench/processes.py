"""The processes benches and tests start: spawn with a ready file, wait for a port, stop, and
account for CPU and memory from /proc.

One module for every bench (run, overload, field's peers, soak, reload soak, profile,
observability cost) and for tests/support, which builds its fixtures on it. Nothing here
imports the server: a bench measures `batchline serve` from the outside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from bench.scrape import Samples, scrape

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "batchline.conf.template"


class LaunchError(RuntimeError):
    """A process did not start; the message says which, why, and ends with its log."""


# ---- ports -----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers that cannot take 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` consecutive free ports (--workers' metrics ports follow the parent's)."""
    for _ in range(50):
        base = free_port()
        if base + count >= 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return list(range(base, base + count))
    raise RuntimeError("no run of free ports")


def wait_for_port(
    name: str, popen: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 10.0
) -> None:
    """Return once something accepts on 127.0.0.1:`port`; LaunchError (the process killed)
    if `popen` exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if popen.poll() is not None:
            raise fail(name, popen, log, f"exited with {popen.returncode}")
        if time.monotonic() > deadline:
            raise fail(name, popen, log, f"nothing listening on {port} after {timeout_s:g} s")
        time.sleep(0.02)  # poll interval of a bounded wait


# ---- start and stop --------------------------------------------------------------------------


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` under `taskset -c cpus` (unchanged when `cpus` is empty or None)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def fail(name: str, popen: subprocess.Popen[bytes], log: Path, why: str) -> LaunchError:
    """Kill `popen` if it still runs; the LaunchError to raise, with the end of its log."""
    if popen.poll() is None:
        popen.kill()
        popen.wait()
    return LaunchError(f"{name} {why}:\n{tail(log)}")


def spawn(
    cmd: list[str],
    log: Path,
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """`cmd` with stdout and stderr appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=new_session,
        )  # fmt: skip


def wait_for_ready_file(
    name: str,
    popen: subprocess.Popen[bytes],
    ready: Path,
    log: Path,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """The JSON of the ready file `popen` writes once it listens (written atomically by
    server/readiness.py and the bench's servers); LaunchError if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if popen.poll() is not None:
            raise fail(name, popen, log, f"exited with {popen.returncode}")
        if time.monotonic() > deadline:
            raise fail(name, popen, log, f"not ready after {timeout_s:g}s")
        time.sleep(0.05)  # poll interval of a bounded wait
    info: dict[str, Any] = json.loads(ready.read_text())
    return info


def start_with_ready_file(
    name: str,
    cmd: list[str],
    ready: Path,
    log: Path,
    *,
    timeout_s: float = 120.0,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    new_session: bool = False,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Run `cmd --ready-file READY` and wait (bounded) for its ready file: (process, its JSON)."""
    ready.unlink(missing_ok=True)
    popen = spawn(
        [*cmd, "--ready-file", str(ready)], log, cwd=cwd, env=env, new_session=new_session
    )
    return popen, wait_for_ready_file(name, popen, ready, log, timeout_s)


def stop(popen: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Send `sig` (if it still runs) and wait; killed after `timeout_s`. The exit code."""
    if popen.poll() is None:
        popen.send_signal(sig)
    try:
        return popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        return popen.wait()


@dataclass
class Spawned:
    """A process started from a ready file: its ports as the file says, its log, `stop()`."""

    name: str
    popen: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path

    @property
    def pid(self) -> int:
        return int(self.info.get("pid", self.popen.pid))

    @property
    def port(self) -> int:
        return int(self.info["grpc_port"])

    @property
    def grpc_port(self) -> int:
        return int(self.info["grpc_port"])

    @property
    def metrics_port(self) -> int:
        return int(self.info.get("metrics_port", 0))

    @property
    def http_port(self) -> int:
        return int(self.info.get("http_port", 0))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def metrics(self) -> Samples:
        """Its /metrics endpoint, parsed (bench/scrape.py)."""
        return scrape(self.metrics_port)

    def stop(self, timeout_s: float = 30.0) -> int:
        return stop(self.popen, timeout_s=timeout_s)


def launch(
    name: str, cmd: list[str], work: Path, *, timeout_s: float = 120.0, **kwargs: Any
) -> Spawned:
    """`start_with_ready_file` with the ready file and log named after `name` in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    ready, log = work / f".ready-{name}.json", work / f".{name}.log"
    log.unlink(missing_ok=True)
    popen, info = start_with_ready_file(name, cmd, ready, log, timeout_s=timeout_s, **kwargs)
    ready.unlink()
    return Spawned(name, popen, info, log)


# ---- nginx, the shipped front ----------------------------------------------------------------


def nginx_binary() -> str | None:
    """nginx on PATH, or Debian's /usr/sbin/nginx (not on a non-root PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


@dataclass
class Nginx:
    """nginx from deploy/nginx/batchline.conf.template in front of one batchline."""

    popen: subprocess.Popen[bytes]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU of the master and its workers (the worker does the work)."""
        return tree_cpu_seconds(self.popen.pid)

    def stop(self) -> None:
        stop(self.popen, signal.SIGQUIT, timeout_s=10)  # graceful: finish what is in flight


def start_nginx(
    upstream_port: int, max_in_flight: int, runtime: Path, cpus: str | None = None
) -> Nginx:
    """nginx (the shipped template) on a free port before 127.0.0.1:`upstream_port`."""
    nginx = nginx_binary()
    if nginx is None:
        raise LaunchError("nginx is not installed (apt-get install nginx-light)")
    runtime.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = runtime / "nginx.conf"
    conf.write_text(
        Template(NGINX_TEMPLATE.read_text()).safe_substitute(
            MAX_IN_FLIGHT=max_in_flight,
            LISTEN=f"127.0.0.1:{port}",
            UPSTREAM=f"127.0.0.1:{upstream_port}",
            RUNTIME=str(runtime),
        )
    )
    log = runtime / "nginx.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            pinned([nginx, "-c", str(conf), "-e", "stderr"], cpus),
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    wait_for_port("nginx", popen, port, log)
    return Nginx(popen, port)


# ---- accounting ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (ppid [1], utime/stime [11]/[12],
    cutime/cstime [13]/[14]); None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` itself (0 once it is gone)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for tid in tasks:
        try:
            out.extend(int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by `root` and every live descendant, plus the children they reaped
    (Triton's python-backend stubs, MLServer's workers, nginx's worker)."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(f) for f in fields[11:15])
        todo.extend(_children(pid))
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB (/proc/PID/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
