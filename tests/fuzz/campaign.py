"""`make fuzz`: every atheris target for FUZZ_SECONDS each, then the Hypothesis mesh suite on its long profile; the
figures (inputs tried, statuses seen, what failed) go into the Fuzzing section of docs/reliability.md.

    python -m tests.fuzz.campaign [--seconds 60] [--write docs/reliability.md]

A target that finds a bug stops with its input saved as crash-*/timeout-*/oom-* in a scratch folder (printed):
add it to tests/fuzz/corpus/<target>/ with the fix, and `make test` replays it from then on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, update_doc
from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SECTION = "Fuzzing"


def run_target(name: str, seconds: int, scratch: Path) -> tuple[int, int, str]:
    """(inputs run, return code, last lines) of one atheris target."""
    folder = scratch / name
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", name, f"-max_total_time={seconds}", "-rss_limit_mb=3072",
         "-timeout=10", f"-artifact_prefix={folder}/"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    runs = re.findall(r"Done (\d+) runs", done.stderr)
    return (int(runs[-1]) if runs else 0), done.returncode, "\n".join(done.stderr.splitlines()[-5:])


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m tests.fuzz.campaign", description=(__doc__ or "").split("\n")[0])
    cli.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "60")))
    cli.add_argument("--write", type=Path, default=None, help="update this markdown file's Fuzzing section")
    args = cli.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="aimass-fuzz-"))
    lines = [
        "## Fuzzing",
        "",
        f"`make fuzz FUZZ_SECONDS={args.seconds} FUZZ_EXAMPLES={os.environ.get('FUZZ_EXAMPLES', '200')}`,"
        f" {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {machine()}.",
        "",
        "Coverage-guided (atheris/libFuzzer) on the byte decoders, each from the seed media and the committed corpus:",
        "",
        "| target | inputs run | result |",
        "|---|---:|---|",
    ]
    failed = False
    for name in TARGETS:
        print(f"==> atheris {name} for {args.seconds} s", flush=True)
        runs, code, tail = run_target(name, args.seconds, scratch)
        failed |= code != 0
        result = "no failure" if code == 0 else f"FAILED (exit {code}; input in {scratch / name})"
        lines.append(f"| {name} | {runs:,} | {result} |")
        if code:
            print(tail, file=sys.stderr)
    report = scratch / "mesh.json"
    print("==> Hypothesis through a live mesh (long profile)", flush=True)
    mesh = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_mesh.py"],
        cwd=ROOT, env={**os.environ, "HYPOTHESIS_PROFILE": "fuzz", "FUZZ_REPORT": str(report)}, check=False,
    )  # fmt: skip
    failed |= mesh.returncode != 0
    seen: dict[str, dict[str, int]] = json.loads(report.read_text()) if report.exists() else {}
    lines += [
        "",
        "Property-based (Hypothesis) through the gateway of a mesh with every service: every public method, fields",
        "at random and boundary values, random/truncated/padded bytes, client streams in any order. Pass: every",
        "answer OK or a documented status with a message, every service SERVING after, no process restarted, RSS",
        f"bounded. Result: {'passed' if mesh.returncode == 0 else 'FAILED (see the pytest output)'}.",
        "",
        "| method | inputs | statuses seen |",
        "|---|---:|---|",
    ]
    for method, statuses in seen.items():
        counts = ", ".join(f"{code} {n}" for code, n in sorted(statuses.items(), key=lambda kv: -kv[1]))
        lines.append(f"| `{method}` | {sum(statuses.values())} | {counts} |")
    text = "\n".join(lines)
    print(text)
    if args.write is not None:
        if not args.write.exists():
            args.write.write_text("# Reliability\n")
        update_doc(args.write, SECTION, text)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
