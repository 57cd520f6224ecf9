"""``python -m loadtest``: ghz's flags, batchline's extras, one report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.options import DEFAULT_CALL, Options
from loadtest.report import FORMATS, render
from loadtest.runner import SetupError, run
from loadtest.stats import parse_duration

EPILOG = """\
examples:
  python -m loadtest 127.0.0.1:8001 --insecure --model churn -c 64 -n 20000
  python -m loadtest 127.0.0.1:8001 --call inference.GRPCInferenceService/ModelStreamInfer \\
      -D request.json -z 10s -O json -o report.json
  python -m loadtest 127.0.0.1:8001 --proto proto/inference.proto --call ModelInfer --model churn
latencies in JSON are nanoseconds; failed calls count in count/rps but not in latency figures;
STREAM_ERROR counts ModelStreamInfer replies that carry error_message.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test a V2 (KServe / Triton) gRPC inference server, ghz-style.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="HOST:PORT", help="server address")
    p.add_argument(
        "--call",
        default=DEFAULT_CALL,
        help="method: %(default)s, .../ModelStreamInfer, or the method alone (ModelInfer)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="plaintext (the only mode; accepted for ghz)"
    )
    p.add_argument("--proto", type=Path, help="resolve --call in this .proto (needs grpcio-tools)")
    p.add_argument(
        "-i", "--import-paths", default="", help="comma-separated import paths for --proto"
    )
    p.add_argument(
        "--protoset", type=Path, help="resolve --call in this FileDescriptorSet (protoc -o)"
    )
    src = p.add_argument_group("request (at most one)")
    src.add_argument("-d", "--data", help="request message as JSON")
    src.add_argument("-D", "--data-file", type=Path, help="file with the request as JSON")
    src.add_argument("-b", "--binary-file", type=Path, help="file with the serialised request")
    src.add_argument("--model", help="build a ModelInferRequest for this model from ModelMetadata")
    src.add_argument(
        "--rows", type=int, default=1, help="rows per request with --model (default 1)"
    )
    src.add_argument("--model-version", default="", help="model version with --model")
    src.add_argument("--typed", action="store_true", help="typed contents instead of raw bytes")
    src.add_argument(
        "--live",
        action="store_true",
        help="with --model: count this load in drift and shadow statistics (by default requests "
        "carry the parameter traffic=loadtest, which keeps them out)",
    )
    load = p.add_argument_group("load")
    load.add_argument("-c", "--concurrency", type=int, default=50, help="workers (default 50)")
    load.add_argument("-n", "--total", type=int, default=200, help="calls (default 200)")
    load.add_argument("-z", "--duration", help="run for this long (10s, 500ms, 1m); overrides -n")
    load.add_argument("--rps", type=float, default=0, help="global rate limit (0: unlimited)")
    load.add_argument("--connections", type=int, default=1, help="gRPC connections (default 1)")
    load.add_argument("-t", "--timeout", default="20s", help="per-call deadline (0: none)")
    load.add_argument("--connect-timeout", default="10s", help="connection wait (default 10s)")
    load.add_argument("--procs", type=int, default=1, help="load processes (default 1)")
    load.add_argument("--skipFirst", type=int, default=0, help="warm-up calls left out of stats")
    out = p.add_argument_group("output")
    out.add_argument("-O", "--format", choices=FORMATS, default="summary")
    out.add_argument("-o", "--output", type=Path, help="write the report here (default stdout)")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    """Raises ValueError naming the flag at fault."""
    return Options(
        target=args.target,
        call=args.call,
        data=args.data,
        data_file=args.data_file,
        binary_file=args.binary_file,
        concurrency=args.concurrency,
        total=args.total,
        duration_s=parse_duration(args.duration, "-z/--duration") if args.duration else None,
        rps=args.rps,
        connections=args.connections,
        timeout_s=parse_duration(args.timeout, "-t/--timeout"),
        connect_timeout_s=parse_duration(args.connect_timeout, "--connect-timeout"),
        procs=args.procs,
        skip_first=args.skipFirst,
        model=args.model,
        rows=args.rows,
        model_version=args.model_version,
        typed=args.typed,
        proto=args.proto,
        import_paths=tuple(Path(p) for p in args.import_paths.split(",") if p),
        protoset=args.protoset,
        live=args.live,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        report = run(options)
    except (ValueError, OSError, SetupError) as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    text = render(report, args.format)
    if args.output is not None:
        args.output.write_text(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
