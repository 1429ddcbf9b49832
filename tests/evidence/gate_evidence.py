"""GPU evidence for the performance gate: does it catch planted slowdowns, and does it stay quiet
on unchanged code? Run on a GPU machine with FlashInfer (falls back to torch SDPA, saying so):

    python tests/evidence/gate_evidence.py --out DIR

For ViT-table rows (16 heads x 80, bf16, full mask) of --backend (default flashinfer), with two
planted wrappers of it:

- planted-device: an extra matmul kernel after each call, sized (measured) so the device time rises
  by at least --device-slowdown (default 5%), in a device-bound row (--seq-len, default 8192);
- planted-host: extra host work before each call (torch ops on a CPU tensor: instructions, as a
  real host regression adds, which slow down with the host as the call's own do; a fixed-length
  busy-wait would not, and its share of a call would drift with the host's speed), calibrated
  (measured) so the eager wall time rises by at least --host-slowdown (default 10%), in a host-bound
  row (--host-seq-len, default 256: there eager time is launch work; in a device-bound row the GPU
  hides host work, rightly);
- --double: twice each slowdown as well;

flows (--flows), each with 5 trials per planted size and 10 unchanged trials (judged on both rows),
in shuffled order:

- pytest: the classic gate as a user runs it, one pytest process per run: a baseline
  (`pytest --benchmark-json base.json`), then each trial `pytest --attn-gate=base.json
  --benchmark-json trial.json` (its exit status and final line kept), judged row by row with the
  gate's code on the two files;
- classic: the same in this process (one baseline measurement, each trial measured later);
- ab: each trial an interleaved A/B (pytest_attn.bench.ab: --ab-rounds rounds of --ab-iters
  samples, default pytest-attn ab's own, sides alternating;
  eager samples taken in turn, with the host reference);
- ab-processes: each trial the `pytest-attn ab` command itself with both sides in subprocesses
  (`--base-python`/`--head-python`, as with `--base-ref`: one process per side per round), the
  planted wrappers reaching them through an entry point (a dist-info folder on PYTHONPATH); its
  exit status and final line kept, each trial judged from the samples its `--json` saved.

The eager regime is judged as the gate judges it: in the pytest and classic flows, a host-bound
row's samples divided one by one by the host reference (bench.timing.HOST_REFERENCE), and so in
ab-processes (samples from different processes cannot pair); in ab, the sides' samples taken in
turn, pair by pair. The rows "eager-raw" judge the same samples undivided
and unpaired, for comparison.

Both regimes are judged with the default thresholds (device 5%, eager 10%) by the gate's rule (the
interval past half the threshold, reaching it); the column "strict" counts the same trials under
the rule that asks the whole interval to lie past the threshold, which a slowdown equal to the
threshold straddles; "unresolved" counts trials whose interval was wider than the threshold (the
gate says so and passes). Prints a table (caught / false alarms per flow, regime and planted size) and
writes DIR/evidence.json with every trial's ratio and interval. Aim: < 8 minutes on an H200.
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
        ops = 0  # host-side torch ops per call
        scratch = torch.zeros(16)

        def set(self, ops):
            self.ops = int(round(ops))

        def before(self):
            for _ in range(self.ops):
                self.scratch.add_(1.0)

    return Unchanged(inner, "unchanged"), PlantedDevice(inner, "planted-device"), PlantedHost(inner, "planted-host")


def backend_from_environment(inner, device):
    """(unchanged, chosen): ``chosen`` planted as $EVIDENCE_MATMUL_N / $EVIDENCE_HOST_OPS say (the
    process flows' runs), else a second unchanged wrapper."""
    unchanged, planted_device, planted_host = make_backends(inner, device)
    matmul_n, host_ops = int(os.environ.get("EVIDENCE_MATMUL_N", "0")), int(os.environ.get("EVIDENCE_HOST_OPS", "0"))
    if matmul_n:
        planted_device.set(matmul_n)
        return unchanged, planted_device
    if host_ops:
        planted_host.set(host_ops)
        return unchanged, planted_host
    return unchanged, make_backends(inner, device)[0]


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


def calibrate_host_work(planted, unchanged, batch, settings, target, label, log):
    """The host ops per call at which the eager time is at least ``1 + target`` times the unchanged
    call's (aiming at 1.03 x target over it): in a host-bound row the extra work adds in proportion,
    so start from one op's cost and correct in proportion to what was measured. Each try times both
    in turn (bench.timing.interleaved_eager_samples), so the host's drift does not misjudge it."""
    import torch

    from pytest_attn.bench.measure import measure_backend
    from pytest_attn.bench.timing import calls_per_sample, interleaved_eager_samples

    scratch = torch.zeros(16)
    start = time.perf_counter()
    for _ in range(10000):
        scratch.add_(1.0)
    per_op = (time.perf_counter() - start) / 10000
    _, timing, forward = measure_backend(unchanged, batch, settings)
    ops = target * statistics.median(timing.samples("eager")) / per_op
    ratio = 0.0
    for _ in range(6):
        planted.set(ops)
        _, _, planted_forward = measure_backend(planted, batch, settings)
        count = calls_per_sample(statistics.median(timing.samples("eager")), False)
        got = interleaved_eager_samples({"base": (forward, count), "planted": (planted_forward, count)},
                                        settings.iters, batch.device)
        ratio = statistics.median(got["planted"]) / statistics.median(got["base"])
        if target <= ratio - 1 < target * 1.2:
            break
        ops *= target * 1.08 / max(ratio - 1, target / 4)
    log(f"  calibrated {label}: {planted.ops} host ops per call ({per_op * 1e6:.2f} us each) -> x{ratio:.3f} (eager)")
    return planted.ops


def raw_eager_verdicts(base_rows, head_rows):
    """The gate's eager verdicts of these rows with the samples undivided and unpaired."""
    import dataclasses

    from pytest_attn.bench.gate import compare_rows

    return compare_rows([dataclasses.replace(r, reference=()) for r in base_rows if r.regime == "eager"],
                        [dataclasses.replace(r, reference=()) for r in head_rows if r.regime == "eager"]).verdicts


def judge(base_samples, head_samples, paired=()):
    """{regime: Verdict} by the gate's own code (row_samples: the eager regime of a host-bound row
    divided by the host reference; ``paired``: the regimes sampled in turn, judged pair by pair),
    "eager-raw": the eager samples undivided and unpaired, and "samples": both sides' samples."""
    from pytest_attn.bench.gate import REGIMES, compare_rows, row_samples

    base, head = row_samples("row", base_samples, REGIMES), row_samples("row", head_samples, REGIMES)
    verdicts = {v.regime: v for v in compare_rows(base, head, paired=paired).verdicts}
    verdicts["eager-raw"] = raw_eager_verdicts(base, head)[0]
    verdicts["samples"] = {"base": base_samples, "head": head_samples}
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", default="flashinfer")
    parser.add_argument("--seq-len", type=int, default=8192, help="the row of the device slowdowns (device-bound)")
    parser.add_argument("--host-seq-len", type=int, default=256,
                        help="the row of the host overhead (host-bound: eager time is launch work there)")
    parser.add_argument("--double", action="store_true", help="also plant twice each slowdown")
    parser.add_argument("--kinds", default="device,host", help="which slowdowns to plant: device, host or both")
    parser.add_argument("--flows", default="pytest,ab",
                        help="which flows to run: pytest (the classic gate, a process per run), classic (the same "
                             "in this process), ab (in this process), ab-processes (the pytest-attn ab command, "
                             "sides in subprocesses); comma-separated")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no trial of a process flow (pytest, ab-processes) past this many seconds")
    parser.add_argument("--device-slowdown", type=float, default=0.05)
    parser.add_argument("--host-slowdown", type=float, default=0.10)
    parser.add_argument("--planted-trials", default="5",
                        help="trials per planted size: N, or per kind: device=N,host=M")
    parser.add_argument("--unchanged-trials", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50, help="samples per regime in the classic flow")
    from pytest_attn.bench.ab import DEFAULT_ITERS, DEFAULT_ROUNDS

    parser.add_argument("--ab-rounds", type=int, default=DEFAULT_ROUNDS, help="as pytest-attn ab's default")
    parser.add_argument("--ab-iters", type=int, default=DEFAULT_ITERS, help="as pytest-attn ab's default")
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
    for fraction in sizes["host"] if "host" in args.kinds else ():
        params[("host", fraction)] = calibrate_host_work(planted_host, unchanged, batches[rows["host"]], settings,
                                                         fraction, f"planted-host +{fraction:.0%}", log)
    planted_host.set(0)

    trials = [("unchanged", 0.0)] * args.unchanged_trials
    per_kind = dict(item.split("=") for item in args.planted_trials.split(",")) if "=" in args.planted_trials \
        else {kind: args.planted_trials for kind in ("device", "host")}
    for kind in args.kinds.split(","):
        trials += [(kind, f) for f in sizes[kind] for _ in range(int(per_kind.get(kind, 0)))]
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

    def write(records):
        (out / "evidence.json").write_text(json.dumps({
            "machine": attn_machine_info(device), "backend": inner.name, "rows": rows,
            "base_ms": {n: {r: statistics.median(b[r]) * 1e3 for r in ("device", "eager")} for n, b in base.items()},
            "calibration": {f"{k}+{f}": v for (k, f), v in params.items()},
            "trials": [{"flow": flow, "planted": kind, "fraction": fraction, "seq_len": n,
                        **{r: {"ratio": v.ratio, "low": v.low, "high": v.high, "threshold": v.threshold,
                               "outcome": v.outcome, "basis": v.basis, "base_spread": v.base_spread,
                               "head_spread": v.head_spread, "pair_spread": v.pair_spread} for r, v in verdicts.items() if hasattr(v, "ratio")},
                        **{key: verdicts[key] for key in ("pytest", "samples") if key in verdicts}}
                       for flow, kind, fraction, n, verdicts in records],
            "table": summarise(records), "seconds": time.perf_counter() - started}, indent=1))
        (out / "log.txt").write_text("\n".join(log_lines) + "\n")

    # classic: one baseline, trials later
    classic_trials = trials if "classic" in args.flows.split(",") else []
    baseline = {n: measure_row(unchanged, batch, settings) for n, batch in batches.items()} if classic_trials else {}
    for kind, fraction in rng.sample(classic_trials, len(classic_trials)):
        backend = side(kind, fraction)
        for n in rows_of(kind):
            records.append(("classic", kind, fraction, n, judge(baseline[n], measure_row(backend, batches[n], settings))))
    planted_device.set(0), planted_host.set(0)
    if classic_trials:
        log(f"classic flow: {len(trials)} trials done")
    # ab: rounds alternating, each trial its own A/B
    from pytest_attn.bench.ab import measure_rounds_in_process, row_label

    ab_settings = BenchSettings(5, args.ab_iters, "auto", False)
    ab_trials = trials if "ab" in args.flows.split(",") else []
    for kind, fraction in rng.sample(ab_trials, len(ab_trials)):
        head = side(kind, fraction)
        a, b = measure_rounds_in_process(unchanged, head, rows_of(kind), device, ab_settings, args.ab_rounds)
        for n in rows_of(kind):
            records.append(("ab", kind, fraction, n, judge(a.rows[row_label(n)], b.rows[row_label(n)],
                                                           paired=tuple(set(a.paired) & set(b.paired)))))
        planted_device.set(0), planted_host.set(0)
        write(records)
    if ab_trials:
        log(f"ab flow: {len(trials)} trials done")

    over_budget = (lambda: args.budget_s is not None and time.perf_counter() - started > args.budget_s)
    if "ab-processes" in args.flows.split(","):
        done = ab_processes_flow(out, args, inner.name, trials, rng, params, rows, records, log,
                                 lambda: write(records), over_budget)
        log(f"ab-processes flow: {done} of {len(trials)} trials done")
    if "pytest" in args.flows.split(","):
        pytest_flow(out, args, inner.name, trials, rng, params, rows, records, log, lambda: write(records))
        log(f"pytest flow: {len(trials)} trials done")
    write(records)
    table = summarise(records)
    for n in sorted(batches):
        for regime in ("device", "eager", "eager-raw"):
            # what the verdict judged: each side's samples, or the pairs' ratios where it paired them
            judged = [v[regime].head_spread if v[regime].pair_spread is None else v[regime].pair_spread
                      for *_, row, v in records if row == n]
            spreads = [x for x in judged if x is not None]
            if spreads:
                what = "pair ratios" if any(v[regime].pair_spread is not None for *_, row, v in records if row == n) \
                    else "samples"
                table.append(f"spread (IQR/median) of the {regime} {what} of row {n} over all trials: "
                             f"median {statistics.median(spreads):.2%}, max {max(spreads):.2%}")
    for line in table:
        log(line)
    write(records)
    log(f"wrote {out / 'evidence.json'}; {time.perf_counter() - started:.0f} s in all")
    return 0


def summarise(records) -> list[str]:
    """caught (planted, in the regime it was planted in) and false alarms (unchanged, or the other
    regime); eager judged as the gate does (divided by the host reference where the row is
    host-bound) and raw ("eager-raw"); for the pytest flow, the exit statuses of the runs."""
    lines = [f"{'flow':<8} {'planted':<10} {'size/regime':>11} {'row':>6} {'trials':>6} {'caught':>7} "
             f"{'other regime flagged':>21} {'median ratio':>12} {'strict':>7} {'unresolved':>10}"]

    def strict(v):  # the whole interval past the threshold
        return v.low > 1 + v.threshold

    groups = {}
    for flow, kind, fraction, n, verdicts in records:
        groups.setdefault((flow, kind, fraction, n), []).append(verdicts)
    for (flow, kind, fraction, n), runs in sorted(groups.items()):
        if kind == "unchanged":
            for regime in ("device", "eager", "eager-raw"):
                alarms = sum(vs[regime].outcome == "regressed" for vs in runs)
                strict_alarms = sum(strict(vs[regime]) for vs in runs)
                ratio = statistics.median(vs[regime].ratio for vs in runs)
                unresolved = sum(vs[regime].outcome == "unresolved" for vs in runs)
                lines.append(f"{flow:<8} {'unchanged':<10} {regime:>11} {n:>6} {len(runs):>6} {'-':>7} "
                             f"{f'{alarms} false alarm(s)':>21} {ratio:>12.3f} {strict_alarms:>7} {unresolved:>10}")
            continue
        other = "eager" if kind == "device" else "device"
        for regime in (("device",) if kind == "device" else ("eager", "eager-raw")):
            caught = sum(vs[regime].outcome == "regressed" for vs in runs)
            flagged = sum(vs[other].outcome == "regressed" for vs in runs)
            ratio = statistics.median(vs[regime].ratio for vs in runs)
            strict_caught = sum(strict(vs[regime]) for vs in runs)
            label = f"+{fraction:.0%} {regime}"
            lines.append(f"{flow:<8} {kind:<10} {label:>11} {n:>6} {len(runs):>6} {f'{caught}/{len(runs)}':>7} "
                         f"{f'{flagged} ({other})':>21} {ratio:>12.3f} {f'{strict_caught}/{len(runs)}':>7} "
                         f"{sum(vs[regime].outcome == 'unresolved' for vs in runs):>10}")
    exits = {}  # the command each trial ran (one record per row): its exit status, once
    for flow, kind, fraction, n, verdicts in records:
        if "pytest" in verdicts:
            exits[(flow, verdicts["pytest"]["run"])] = (kind, verdicts["pytest"]["exit"])
    commands = {"pytest": "pytest --attn-gate", "ab-proc": "pytest-attn ab (sides in subprocesses)"}
    for flow, command in commands.items():
        for kind in ("unchanged", "device", "host"):
            codes = [code for (f, _), (k, code) in exits.items() if f == flow and k == kind]
            if codes:
                want = 0 if kind == "unchanged" else 1
                lines.append(f"{command}, {kind} runs: exit {want} in {codes.count(want)}/{len(codes)} "
                             f"(exits {sorted(codes)})")
    return lines


PYTEST_FLOW_TEST = '''
import sys

import pytest

sys.path.insert(0, {here!r})
import gate_evidence
from pytest_attn.bench.ab import vit_batch
from pytest_attn.env.registry import Registry

_CHOSEN = []


def backend_of_this_run():
    """unchanged, or planted as $EVIDENCE_MATMUL_N / $EVIDENCE_HOST_OPS say."""
    if not _CHOSEN:
        _CHOSEN.append(gate_evidence.backend_from_environment(Registry.discover().get({backend!r}), {device!r})[1])
    return _CHOSEN[0]


@pytest.mark.parametrize("seq_len", {seq_lens!r})
def test_row(attn_benchmark, bench_metric, seq_len):
    attn_benchmark(backend_of_this_run(), vit_batch(seq_len, {device!r}), series="evidence", metric=bench_metric)
'''
PYTEST_FLOW_CONFTEST = '''
def pytest_generate_tests(metafunc):
    if "bench_metric" in metafunc.fixturenames:
        metafunc.parametrize("bench_metric", ["device", "eager"])
'''


def own_session_environment() -> dict:
    """This process's environment less what marks it a pytest-xdist worker: a run this script starts
    is a session of its own (pytest-benchmark switches itself off in an xdist worker)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def pytest_flow(out: Path, args, backend: str, trials, rng, params, rows, records, log, save) -> None:
    """The classic gate as a user runs it: a baseline pytest run, then one pytest run per trial with
    --attn-gate=base.json (exit status and final line kept) and --benchmark-json, each judged row by
    row with the gate's code on the two saved files. Appends to ``records``; ``save()`` after each."""
    import re

    from pytest_attn.bench.gate import compare_rows, load_saved

    folder = out / "pytest_flow"
    folder.mkdir(exist_ok=True)
    seq_lens = sorted(set(rows.values()))
    (folder / "test_evidence_row.py").write_text(PYTEST_FLOW_TEST.format(here=str(HERE), backend=backend,
                                                                          seq_lens=seq_lens, device=args.device))
    (folder / "conftest.py").write_text(PYTEST_FLOW_CONFTEST)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
               f"--attn-device={args.device}", *(["--attn-gate-cpu"] if args.device == "cpu" else []), "-m", "", "--benchmark-only", f"--attn-bench-iters={args.iters}",
               "test_evidence_row.py", "--rootdir", str(folder), "-c", os.devnull]

    def run(name, extra, kind="unchanged", fraction=0.0):
        env = dict(own_session_environment(), EVIDENCE_MATMUL_N="0", EVIDENCE_HOST_OPS="0")
        if kind != "unchanged":
            env["EVIDENCE_MATMUL_N" if kind == "device" else "EVIDENCE_HOST_OPS"] = str(int(params[(kind, fraction)]))
        done = subprocess.run(command + extra, cwd=folder, env=env, capture_output=True, text=True)
        final = [line for line in done.stdout.splitlines() if line.startswith("pytest-attn gate")]
        line = final[-1] if final else done.stdout.strip()[-300:] + done.stderr.strip()[-300:]
        log(f"pytest {name} ({kind}): exit {done.returncode}; {line}")
        return done.returncode, line

    code, line = run("baseline", ["--benchmark-json=base.json"])
    if code != 0:
        raise SystemExit(f"the baseline pytest run failed (exit {code}): {line}")
    base = load_saved(folder / "base.json")

    def seq_len_of(name):
        return int(re.findall(r"\d+", name.split("[")[-1])[0])

    for index, (kind, fraction) in enumerate(rng.sample(trials, len(trials))):
        saved = f"trial{index}.json"
        code, line = run(f"trial {index}", [f"--benchmark-json={saved}", "--attn-gate=base.json"], kind, fraction)
        head = load_saved(folder / saved)
        verdicts = compare_rows(base.rows, head.rows).verdicts
        raw = raw_eager_verdicts(base.rows, head.rows)
        for n in (seq_lens if kind == "unchanged" else [rows[kind]]):
            judged = {v.regime: v for v in verdicts if seq_len_of(v.name) == n}
            judged["eager-raw"] = next(v for v in raw if seq_len_of(v.name) == n)
            judged["pytest"] = {"run": index, "exit": code, "final": line}
            records.append(("pytest", kind, fraction, n, judged))
        save()


AB_SIDES_MODULE = '''"""gate_evidence's ab-processes flow: evidence-base (the backend unchanged) and evidence-head (planted as
$EVIDENCE_MATMUL_N / $EVIDENCE_HOST_OPS say, else unchanged), loaded in each pytest-attn ab subprocess."""
import sys

sys.path.insert(0, {here!r})


def backends():
    import gate_evidence
    from pytest_attn.env.registry import builtin_backends

    inner = next(b for b in builtin_backends() if b.name == {backend!r})
    unchanged, head = gate_evidence.backend_from_environment(inner, {device!r})
    unchanged.name, head.name = "evidence-base", "evidence-head"
    return [unchanged, head]
'''


def ab_processes_flow(out: Path, args, backend: str, trials, rng, params, rows, records, log, save, over_budget) -> int:
    """Each trial ``pytest-attn ab --base evidence-base --head evidence-head`` with both sides in
    subprocesses (--base-python/--head-python: one process per side per round, as --base-ref runs),
    judged from its --json samples by the gate's code; its exit status and final line kept.
    Returns the number of trials run (fewer when ``over_budget()`` stops it)."""
    folder = out / "ab_processes"
    site = folder / "site"
    dist = site / "attn_evidence_sides-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attn-evidence-sides\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[pytest_attn.backends]\nevidence = attn_evidence_sides:backends\n")
    (site / "attn_evidence_sides.py").write_text(AB_SIDES_MODULE.format(here=str(HERE), backend=backend,
                                                                        device=args.device))
    python = sys.executable
    done = 0
    for index, (kind, fraction) in enumerate(rng.sample(trials, len(trials))):
        if over_budget():
            log(f"ab-processes: out of time budget after {done} trials")
            break
        seq_lens = sorted(set(rows.values())) if kind == "unchanged" else [rows[kind]]
        env = dict(own_session_environment(), EVIDENCE_MATMUL_N="0", EVIDENCE_HOST_OPS="0",
                   PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if kind != "unchanged":
            env["EVIDENCE_MATMUL_N" if kind == "device" else "EVIDENCE_HOST_OPS"] = str(int(params[(kind, fraction)]))
        saved = folder / f"trial{index}.json"
        command = [python, "-c", "import sys; from pytest_attn.cli.main import main; sys.exit(main())", "ab",
                   "--base", "evidence-base", "--base-python", python, "--head", "evidence-head",
                   "--head-python", python, "--seq-lens", ",".join(map(str, seq_lens)), "--device", args.device,
                   "--rounds", str(args.ab_rounds), "--iters", str(args.ab_iters), "--json", str(saved),
                   *(["--gate-cpu"] if args.device == "cpu" else [])]
        t0 = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("pytest-attn gate")]
        final = lines[-1] if lines else (result.stdout.strip()[-300:] + result.stderr.strip()[-300:])
        log(f"ab-processes trial {index} ({kind}): exit {result.returncode} in {time.perf_counter() - t0:.0f} s; "
            f"{final}")
        if not saved.exists():
            raise SystemExit(f"pytest-attn ab wrote no {saved.name} (exit {result.returncode}): {final}")
        written = json.loads(saved.read_text())
        for n in seq_lens:
            label = f"vit-table seq {n}"
            judged = judge(written["samples"]["base"][label], written["samples"]["head"][label])
            command_said = {v["regime"]: v["outcome"] for v in written["verdicts"] if v["name"] == label}
            if any(judged[r].outcome != command_said.get(r) for r in ("device", "eager")):
                raise SystemExit(f"trial {index}, {label}: the gate's code on the saved samples says "
                                 f"{ {r: judged[r].outcome for r in ('device', 'eager')} }, the command said {command_said}")
            judged["pytest"] = {"run": f"ab{index}", "exit": result.returncode, "final": final}
            records.append(("ab-proc", kind, fraction, n, judged))
        done += 1
        save()
    return done


if __name__ == "__main__":
    sys.exit(main())
