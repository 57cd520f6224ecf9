"""Render a Report as ghz does: a short human summary, or JSON (compact or pretty)."""

from __future__ import annotations

import json

from loadtest.stats import Report

FORMATS = ("summary", "json", "pretty")
_BAR = "∎"
_BAR_WIDTH = 40


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict())
    if fmt == "pretty":
        return json.dumps(report.to_dict(), indent=2)
    if fmt == "summary":
        return summary(report)
    raise ValueError(f"-O/--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms"


def summary(report: Report) -> str:
    lines = [
        "",
        "Summary:",
        f"  Call:\t{report.call}",
        f"  Count:\t{report.count}",
        f"  Total:\t{_ms(report.total_ns)}",
        f"  Slowest:\t{_ms(report.slowest_ns)}",
        f"  Fastest:\t{_ms(report.fastest_ns)}",
        f"  Average:\t{_ms(report.average_ns)}",
        f"  Requests/sec:\t{report.rps:.2f}",
        f"  Client CPU:\t{report.client_cpu_seconds:.2f} s "
        f"(concurrency {report.concurrency}, procs {report.procs})",
    ]
    if report.histogram:
        top = max(b.count for b in report.histogram) or 1
        lines += ["", "Response time histogram:"]
        for b in report.histogram:
            bar = _BAR * round(_BAR_WIDTH * b.count / top)
            lines.append(f"  {b.mark_ns / 1e6:.3f} [{b.count}]\t|{bar}")
    if report.latency_distribution:
        lines += ["", "Latency distribution:"]
        lines += [
            f"  {p.percentage:g} % in {_ms(p.latency_ns)}" for p in report.latency_distribution
        ]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{code}]\t{n} responses" for code, n in report.status_codes.items()]
    if report.errors:
        lines += ["", "Error distribution:"]
        lines += [f"  [{n}]\t{message}" for message, n in report.errors.items()]
    return "\n".join(lines) + "\n"
