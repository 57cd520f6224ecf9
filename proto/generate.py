"""Generate server/_proto from proto/ (run: python proto/generate.py [--check]).

The proto path is mirrored into the package path (-Iserver/_proto=proto), so generated imports
are absolute. One deterministic rewrite follows protoc: the modules register into batchline's own
descriptor pool (server/_proto/_pool.py) instead of protobuf's default one. Triton's tritonclient
defines the same `inference.*` symbols in the default pool, and the two could not be imported in
one process otherwise; the wire format is unaffected.
"""

from __future__ import annotations

import argparse
import difflib
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every .proto in proto/ is generated; the list is derived so adding a file needs no edit here.
PROTOS = tuple(sorted(p.name for p in (ROOT / "proto").glob("*.proto")))
OUT = ROOT / "server" / "_proto"
POOL_IMPORT = "from server._proto._pool import POOL as _POOL\n"


def _rewrite(text: str) -> str:
    if "_descriptor_pool.Default()" not in text:
        return text
    text = text.replace("_descriptor_pool.Default()", "_POOL")
    anchor = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
    return text.replace(anchor, anchor + POOL_IMPORT)


def generate(dest: pathlib.Path) -> list[pathlib.Path]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Iserver/_proto={ROOT / 'proto'}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(ROOT / "proto" / p) for p in PROTOS),
        ]
        subprocess.run(cmd, check=True)
        produced = []
        for path in sorted((pathlib.Path(tmp) / "server" / "_proto").iterdir()):
            target = dest / path.name
            target.write_text(_rewrite(path.read_text()))
            produced.append(target)
    return produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if server/_proto is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        stale = False
        for path in fresh:
            current = OUT / path.name
            old = current.read_text() if current.exists() else ""
            if old != path.read_text():
                stale = True
                sys.stdout.writelines(
                    difflib.unified_diff(
                        old.splitlines(True),
                        path.read_text().splitlines(True),
                        str(current),
                        "fresh",
                    )
                )
        if stale:
            print("server/_proto is stale: run `python proto/generate.py`", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
