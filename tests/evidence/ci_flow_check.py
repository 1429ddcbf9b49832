"""The README's CI flow, rerun unchanged N times on this machine (CPU or GPU): a baseline saved with
--benchmark-json, then N runs gated against it with --attn-gate. Counts the runs that failed; on an
unchanged tree that must be 0 (on CPU the gate shows its table and does not gate: CPU CI never fails
on noise).

    python tests/evidence/ci_flow_check.py --runs 10 [--backend torch] [-- extra pytest args]

Prints one line per run and a final `ci flow: N runs, F failed`; exit 1 when any failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="attn-ci-flow-")
    common = [sys.executable, "-m", "pytest", "--pyargs", "pytest_attn.suite", "-m", "attn_bench", "-q", "-p",
              "no:randomly", "-p", "no:cacheprovider", f"--attn-backend={args.backend}", *args.extra]
    base = subprocess.run([*common, "--benchmark-json=base.json"], cwd=folder, capture_output=True, text=True)
    if base.returncode != 0:
        print(base.stdout[-2000:], base.stderr[-2000:])
        print("ci flow: the baseline run failed")
        return 1
    failed = 0
    for index in range(args.runs):
        done = subprocess.run([*common, "--attn-gate=base.json"], cwd=folder, capture_output=True, text=True)
        last = [line for line in done.stdout.splitlines() if line.startswith("pytest-attn gate")]
        failed += done.returncode != 0
        said = last[-1] if last else done.stdout.strip()[-200:]
        print(f"run {index + 1}: exit {done.returncode}; {said}", flush=True)
    print(f"ci flow: {args.runs} runs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
