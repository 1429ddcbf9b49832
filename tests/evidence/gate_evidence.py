"""GPU evidence for the performance gate: does it catch planted slowdowns, and does it stay quiet
on unchanged code? Run on a GPU machine with FlashInfer (falls back to torch SDPA, saying so):

    python tests/evidence/gate_evidence.py --out DIR

For ViT-table rows (16 heads x 80, bf16, full mask) of --backend (default flashinfer), with two
planted wrappers of it:

- planted-device: an extra matmul kernel after each call, sized (measured) so the device time rises
  by at least --device-slowdown (default 5%), in a device-bound row (--seq-len, default 8192);
- planted-host: a busy-wait on the host before each call, calibrated (measured) so the eager wall
  time rises by at least --host-slowdown (default 10%), in a host-bound row (--host-seq-len, default
  256: there eager time is launch work; in a device-bound row the GPU hides host work, rightly);
- --double: twice each slowdown as well;

two flows, each with 5 trials per planted size and 10 unchanged trials (judged on both rows), in
shuffled order:

- classic: one baseline measurement, then each trial measured later and judged by the gate
  (pytest_attn.bench.gate, the code behind --attn-gate and `pytest-attn gate`) on every sample;
- ab: each trial an interleaved A/B (pytest_attn.bench.ab: --ab-rounds rounds, sides alternating;
  eager samples taken in turn).

Both regimes are judged with the default thresholds (device 5%, eager 10%) by the gate's rule (the
interval past half the threshold, reaching it); the column "strict" counts the same trials under
the rule that asks the whole interval to lie past the threshold, which a slowdown equal to the
threshold straddles; "unresolved" counts trials whose interval was wider than the threshold (the
gate says so and passes). Prints a table (caught / false alarms per flow, regime and planted size) and
writes DIR/evidence.json with every trial's ratio and interval. Aim: < 8 minutes on an H200.
Also runs end-to-end `pytest --attn-gate` once on a planted-device slowdown of the threshold's size
and once unchanged (--no-pytest-flow to skip).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _delegate_class():
    from pytest_attn.core.contract import Backend

    class Delegate(Backend):
        """``inner`` under another name, plus planted work (a subclass's ``extra``)."""

        def __init__(self, inner, name):
            self.inner = inner
            self.name = name
            self.capabilities = inner.capabilities
            self.requires_contiguous = inner.requires_contiguous

        def available(self):
            return self.inner.available()

        def unsupported(self, layer, metadata, device="cpu"):
            return self.inner.unsupported(layer, metadata, device)

        def tolerance(self, dtype):
            return self.inner.tolerance(dtype)

        def plan(self, metadata, layer, device="cpu"):
            return self.inner.plan(metadata, layer, device=device)

        def forward(self, q, k, v, metadata, plan, out=None, lse=None):
            self.before()
            kwargs = {"out": out} if lse is None else {"out": out, "lse": lse}
            result = self.inner.forward(q, k, v, metadata, plan, **kwargs)
            self.after()
            return result

        def before(self):
            pass

        def after(self):
            pass

    return Delegate


def make_backends(inner, device="cuda:0"):
    import torch

    Delegate = _delegate_class()

    class Unchanged(Delegate):
        pass

    class PlantedDevice(Delegate):
        size = 0  # the extra matmul's n; 0: none

        def set(self, n):
            self.size = int(n)
            self.a = torch.randn(self.size, self.size, device=device, dtype=torch.bfloat16) if self.size else None
            self.c = torch.empty_like(self.a) if self.size else None

        def after(self):
            if self.size:
                torch.matmul(self.a, self.a, out=self.c)

    class PlantedHost(Delegate):
        wait_s = 0.0

        def set(self, wait_s):
            self.wait_s = float(wait_s)

        def before(self):
            if self.wait_s:
                end = time.perf_counter() + self.wait_s
                while time.perf_counter() < end:
                    pass

    return Unchanged(inner, "unchanged"), PlantedDevice(inner, "planted-device"), PlantedHost(inner, "planted-host")


def median_of(backend, batch, settings, regime):
    from pytest_attn.bench.ab import measure_row

    return statistics.median(measure_row(backend, batch, settings)[regime])


def calibrate(backend, batch, settings, regime, base_s, target, start, grow, label, log):
    """Find the parameter (matmul n, or wait seconds) at which ``regime``'s median is
    ``base_s * (1 + target)`` or a little over (a planted slowdown of 5% is at least 5%): grow until
    past, then bisect (10 measurements at most after that)."""
    low, high, value = 0.0, None, start
    for _ in range(12):
        backend.set(value)
        ratio = median_of(backend, batch, settings, regime) / base_s
        if ratio - 1 >= target:
            high = value
            break
        low, value = value, value * grow
    if high is None:
        raise SystemExit(f"{label}: could not reach +{target:.0%} (last ratio {ratio:.3f})")
    for _ in range(10):
        mid = (low + high) / 2
        backend.set(mid)
        ratio = median_of(backend, batch, settings, regime) / base_s
        if 0 <= ratio - 1 - target < target * 0.15:
            log(f"  calibrated {label}: parameter {mid:.6g} -> x{ratio:.3f} ({regime})")
            return mid
        low, high = (mid, high) if ratio - 1 < target else (low, mid)
    backend.set(high)
    log(f"  calibrated {label}: parameter {high:.6g} (bisection ended)")
    return high


def calibrate_wait(backend, batch, settings, base_s, target, label, log):
    """The busy-wait at which the eager median is at least ``base_s * (1 + target)``: in a host-bound
    row a wait adds about itself, so start at ``target * base_s`` and correct in proportion to what
    was measured (with the full settings: the quick ones misjudged a 5 us wait as +10% on an H200)."""
    wait = target * base_s
    for _ in range(4):
        backend.set(wait)
        ratio = median_of(backend, batch, settings, "eager") / base_s
        if target <= ratio - 1 < target * 1.15:
            break
        wait *= target * 1.05 / max(ratio - 1, target / 4)
    log(f"  calibrated {label}: wait {wait * 1e6:.2f} us -> x{ratio:.3f} (eager)")
    return wait


def judge(base_samples, head_samples):
    """{regime: Verdict} by the gate's own code."""
    from pytest_attn.bench.gate import RowSamples, compare_rows

    base = [RowSamples("row", r, tuple(s)) for r, s in base_samples.items()]
    head = [RowSamples("row", r, tuple(s)) for r, s in head_samples.items()]
    return {v.regime: v for v in compare_rows(base, head).verdicts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="flashinfer")
    parser.add_argument("--seq-len", type=int, default=8192, help="the row of the device slowdowns (device-bound)")
    parser.add_argument("--host-seq-len", type=int, default=256,
                        help="the row of the host overhead (host-bound: eager time is launch work there)")
    parser.add_argument("--double", action="store_true", help="also plant twice each slowdown")
    parser.add_argument("--kinds", default="device,host", help="which slowdowns to plant: device, host or both")
    parser.add_argument("--flows", default="classic,ab", help="which flows to run: classic, ab or both")
    parser.add_argument("--device-slowdown", type=float, default=0.05)
    parser.add_argument("--host-slowdown", type=float, default=0.10)
    parser.add_argument("--planted-trials", type=int, default=5)
    parser.add_argument("--unchanged-trials", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50, help="samples per regime in the classic flow")
    parser.add_argument("--ab-rounds", type=int, default=4)
    parser.add_argument("--ab-iters", type=int, default=12)
    parser.add_argument("--no-pytest-flow", action="store_true")
    parser.add_argument("--device", default="cuda:0", help="cpu: a smoke test of this script's code only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log_lines = []

    def log(line):
        line = f"[{time.perf_counter() - started:6.1f}s] {line}"
        print(line, flush=True)
        log_lines.append(line)

    import torch

    from pytest_attn.bench.ab import measure_row, vit_batch
    from pytest_attn.bench.machine import attn_machine_info
    from pytest_attn.bench.measure import BenchSettings
    from pytest_attn.core import calls
    from pytest_attn.env.registry import Registry

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gate_evidence: needs a CUDA GPU (--device cpu: a smoke test of the script only)")
    registry = Registry.discover()
    inner = registry.get(args.backend)
    if not calls.availability(inner):
        log(f"{args.backend} unavailable ({calls.availability(inner).reason}); using torch")
        inner = registry.get("torch")
    device = args.device
    rows = {"device": args.seq_len, "host": args.host_seq_len}  # the row each kind of slowdown is planted in
    batches = {n: vit_batch(n, device) for n in set(rows.values())}
    settings = BenchSettings(10, args.iters, "auto", False)
    quick = BenchSettings(5, 20, "auto", False)
    unchanged, planted_device, planted_host = make_backends(inner, device)
    log(f"backend {inner.name}, device slowdowns at seq_len {rows['device']}, host overhead at seq_len "
        f"{rows['host']}, {torch.cuda.get_device_name(0) if device.startswith('cuda') else 'cpu (smoke test)'}")
    base = {n: measure_row(unchanged, batch, quick) for n, batch in batches.items()}
    for n, b in base.items():
        log(f"unchanged seq_len {n}: device {statistics.median(b['device']) * 1e3:.4f} ms, "
            f"eager {statistics.median(b['eager']) * 1e3:.4f} ms")

    factors = (1, 2) if args.double else (1,)
    sizes = {"device": [args.device_slowdown * f for f in factors], "host": [args.host_slowdown * f for f in factors]}
    params = {}
    for fraction in sizes["device"] if "device" in args.kinds else ():
        params[("device", fraction)] = calibrate(planted_device, batches[rows["device"]], quick, "device",
                                                 statistics.median(base[rows["device"]]["device"]), fraction, 256,
                                                 1.4, f"planted-device +{fraction:.0%}", log)
    planted_device.set(0)
    base_eager = statistics.median(base[rows["host"]]["eager"])
    for fraction in sizes["host"] if "host" in args.kinds else ():
        params[("host", fraction)] = calibrate_wait(planted_host, batches[rows["host"]], settings, base_eager,
                                                    fraction, f"planted-host +{fraction:.0%}", log)
    planted_host.set(0)

    trials = [("unchanged", 0.0)] * args.unchanged_trials
    for kind in args.kinds.split(","):
        trials += [(kind, f) for f in sizes[kind] for _ in range(args.planted_trials)]
    rng = random.Random(20261204)
    records = []

    def side(kind, fraction):
        if kind == "unchanged":
            return unchanged
        backend = planted_device if kind == "device" else planted_host
        backend.set(params[(kind, fraction)])
        return backend

    def rows_of(kind):  # an unchanged trial is judged on every row
        return sorted(batches) if kind == "unchanged" else [rows[kind]]

    # classic: one baseline, trials later
    classic_trials = trials if "classic" in args.flows else []
    baseline = {n: measure_row(unchanged, batch, settings) for n, batch in batches.items()} if classic_trials else {}
    for kind, fraction in rng.sample(classic_trials, len(classic_trials)):
        backend = side(kind, fraction)
        for n in rows_of(kind):
            records.append(("classic", kind, fraction, n, judge(baseline[n], measure_row(backend, batches[n], settings))))
    planted_device.set(0), planted_host.set(0)
    log(f"classic flow: {len(trials)} trials done")
    # ab: rounds alternating, each trial its own A/B
    from pytest_attn.bench.ab import measure_rounds_in_process, row_label

    ab_settings = BenchSettings(5, args.ab_iters, "auto", False)
    ab_trials = trials if "ab" in args.flows else []
    for kind, fraction in rng.sample(ab_trials, len(ab_trials)):
        head = side(kind, fraction)
        a, b = measure_rounds_in_process(unchanged, head, rows_of(kind), device, ab_settings, args.ab_rounds)
        for n in rows_of(kind):
            records.append(("ab", kind, fraction, n, judge(a.rows[row_label(n)], b.rows[row_label(n)])))
        planted_device.set(0), planted_host.set(0)
    log(f"ab flow: {len(trials)} trials done")

    table = summarise(records)
    for regime in ("device", "eager"):
        spreads = [v[regime].head_spread for *_, v in records if v[regime].head_spread is not None]
        if spreads:
            table.append(f"spread (IQR/median) of the {regime} samples over all trials: "
                         f"median {statistics.median(spreads):.2%}, "
                         f"max {max(spreads):.2%}")
    for line in table:
        log(line)

    def write(pytest_lines):
        (out / "evidence.json").write_text(json.dumps({
            "machine": attn_machine_info(device), "backend": inner.name, "rows": rows,
            "base_ms": {n: {r: statistics.median(b[r]) * 1e3 for r in ("device", "eager")} for n, b in base.items()},
            "calibration": {f"{k}+{f}": v for (k, f), v in params.items()},
            "trials": [{"flow": flow, "planted": kind, "fraction": fraction, "seq_len": n,
                        **{r: {"ratio": v.ratio, "low": v.low, "high": v.high, "threshold": v.threshold,
                               "outcome": v.outcome, "base_spread": v.base_spread, "head_spread": v.head_spread}
                           for r, v in verdicts.items()}}
                       for flow, kind, fraction, n, verdicts in records],
            "table": table, "pytest_flow": pytest_lines, "seconds": time.perf_counter() - started}, indent=1))
        (out / "log.txt").write_text("\n".join(log_lines) + "\n")

    write([])  # kept if the pytest flow below is cut short
    if not (args.no_pytest_flow or device == "cpu"):
        write(pytest_flow(out, args, params, sizes, log))
    log(f"wrote {out / 'evidence.json'}; {time.perf_counter() - started:.0f} s in all")
    return 0


def summarise(records) -> list[str]:
    """caught (planted, in the regime it was planted in) and false alarms (unchanged, or the other regime)."""
    lines = [f"{'flow':<8} {'planted':<10} {'size':>6} {'row':>6} {'trials':>6} {'caught':>7} "
             f"{'other regime flagged':>21} {'median ratio (planted regime)':>30} {'strict':>7} {'unresolved':>10}"]

    def strict(v):  # the whole interval past the threshold
        return v.low > 1 + v.threshold

    groups = {}
    for flow, kind, fraction, n, verdicts in records:
        groups.setdefault((flow, kind, fraction, n), []).append(verdicts)
    for (flow, kind, fraction, n), runs in sorted(groups.items()):
        if kind == "unchanged":
            for regime in ("device", "eager"):
                alarms = sum(vs[regime].outcome == "regressed" for vs in runs)
                strict_alarms = sum(strict(vs[regime]) for vs in runs)
                ratio = statistics.median(vs[regime].ratio for vs in runs)
                unresolved = sum(vs[regime].outcome == "unresolved" for vs in runs)
                lines.append(f"{flow:<8} {'unchanged':<10} {regime:>6} {n:>6} {len(runs):>6} {'-':>7} "
                             f"{f'{alarms} false alarm(s)':>21} {ratio:>30.3f} {strict_alarms:>7} {unresolved:>10}")
            continue
        regime = "device" if kind == "device" else "eager"
        other = "eager" if regime == "device" else "device"
        caught = sum(vs[regime].outcome == "regressed" for vs in runs)
        flagged = sum(vs[other].outcome == "regressed" for vs in runs)
        ratio = statistics.median(vs[regime].ratio for vs in runs)
        strict_caught = sum(strict(vs[regime]) for vs in runs)
        lines.append(f"{flow:<8} {kind:<10} {f'+{fraction:.0%}':>6} {n:>6} {len(runs):>6} {f'{caught}/{len(runs)}':>7} "
                     f"{f'{flagged} ({other})':>21} {ratio:>30.3f} {f'{strict_caught}/{len(runs)}':>7} "
                     f"{sum(vs[regime].outcome == 'unresolved' for vs in runs):>10}")
    return lines


PYTEST_FLOW_TEST = '''
import os, sys
sys.path.insert(0, {here!r})
import gate_evidence
from pytest_attn.bench.ab import vit_batch
from pytest_attn.env.registry import Registry


def test_row(attn_benchmark, bench_metric):
    inner = Registry.discover().get({backend!r})
    unchanged, planted_device, _ = gate_evidence.make_backends(inner)
    n = int(os.environ.get("EVIDENCE_MATMUL_N", "0"))
    backend = planted_device if n else unchanged
    if n:
        backend.set(n)
    attn_benchmark(backend, vit_batch({seq_len}, "cuda:0"), series="evidence", metric=bench_metric)
'''
PYTEST_FLOW_CONFTEST = '''
import pytest

def pytest_generate_tests(metafunc):
    if "bench_metric" in metafunc.fixturenames:
        metafunc.parametrize("bench_metric", ["device", "eager"])
'''


def pytest_flow(out: Path, args, params, sizes, log) -> list[str]:
    """`pytest --attn-gate` end to end: baseline, unchanged (must pass), planted-device (must fail)."""
    folder = out / "pytest_flow"
    folder.mkdir(exist_ok=True)
    (folder / "test_evidence_row.py").write_text(PYTEST_FLOW_TEST.format(here=str(HERE), backend=args.backend,
                                                                          seq_len=args.seq_len))
    (folder / "conftest.py").write_text(PYTEST_FLOW_CONFTEST)
    base_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                "--attn-device=cuda:0", "-m", "", "--benchmark-only", "test_evidence_row.py", "--rootdir", str(folder),
                "-c", os.devnull]
    lines = []
    env = dict(os.environ)
    for name, extra, n in (("baseline", ["--benchmark-json=base.json"], 0),
                           ("unchanged", ["--attn-gate=base.json"], 0),
                           ("planted-device", ["--attn-gate=base.json"], params[("device", sizes["device"][0])])):
        env["EVIDENCE_MATMUL_N"] = str(int(n))
        done = subprocess.run(base_cmd + extra, cwd=folder, env=env, capture_output=True, text=True)
        tail = [line for line in done.stdout.splitlines() if line.startswith("pytest-attn gate")]
        lines.append(f"pytest flow {name}: exit {done.returncode}; {tail[-1] if tail else done.stdout.strip()[-300:]}")
        log(lines[-1])
    return lines


if __name__ == "__main__":
    sys.exit(main())
