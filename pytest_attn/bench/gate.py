"""The performance gate: is HEAD slower than BASE, row by row, beyond noise?

Each row's verdict comes from its two sample sets (every timed sample, kept in the saved JSON's
``extra_info["samples_s"]``, or pytest-benchmark's ``stats.data`` with --benchmark-save-data): the
ratio of medians HEAD/BASE, with a bootstrap confidence interval (scipy.stats.bootstrap, percentile
method, both sets resampled independently, a fixed seed so that a rerun prints the same interval).
A row **regressed** when its interval lies wholly above ``1 + threshold / 2`` (a slowdown of at
least half the threshold is certain) and reaches ``1 + threshold`` (one of the threshold's size is
within it); **improved** is the mirror image; a row whose interval is wider than the threshold
is **unresolved** (its samples cannot tell a regression of that size from none: it is said, and
does not fail the run); otherwise it is unchanged, however its median moved.
Why half: the threshold is the slowdown the gate must catch, and a slowdown *equal* to it puts the
interval across the threshold, so a rule asking the whole interval to lie past the threshold
misses it (0 of 40 simulated rows, tests/test_perf_gate.py; on a GPU: tests/evidence/gate_evidence.py).
Why "reaches": a tight interval around a small steady drift (+3% against a 5% threshold) is not
a regression of the threshold's size, and does not fail a run.
A host-bound row (eager median at least HOST_BOUND_FACTOR times the device median: eager time is
the host's launch work there) is judged on its eager samples each divided by the host reference
sample taken in turn with it (bench.timing.HOST_REFERENCE), when both runs kept those: the host's
speed drifts by up to 1.5-2x over seconds and 5-12% between processes on the machines measured,
and it drifts for the reference alike, so it cancels; a regression in the backend's own host work
does not. A row where eager time is device time is judged raw (dividing it by the host's speed
would add the host's drift to it). Samples the two sides took in turn, one of each at a time
(``pytest-attn ab`` in one process: ``paired``), are judged pair by pair instead: the interval is
that of the median of HEAD_i / BASE_i, so a drift shared by a pair cancels exactly (the host
reference, taken in the same turn, would cancel from the pair's ratio anyway). Rows judged either
way show as ``eager*``, with a line saying how.
Thresholds are per regime (DEFAULT_THRESHOLDS: device time is steadier than eager wall time) and
per row (``extra_info["gate_threshold"]``, set by the ``attn_gate_threshold`` marker or the
fixture's ``threshold=``). The Mann-Whitney U p-value is shown beside the interval, not used.

Runs from different machines or library versions are refused (machine.differences names what
differs), and CPU timings are reported but not gated unless asked (``gate_cpu``): CPU CI must not
fail on a noisy neighbour. No pytest, no torch.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from pytest_attn.bench.machine import differences, is_cpu_run
from pytest_attn.bench.measure import spread
from pytest_attn.bench.timing import HOST_REFERENCE

REGIMES = ("device", "eager")
DEFAULT_THRESHOLDS = {"device": 0.05, "eager": 0.10}
CONFIDENCE = 0.95
RESAMPLES = 2000
MIN_SAMPLES = 5  # fewer samples per side give no interval worth gating on
BOOTSTRAP_SEED = 20261204
HOST_BOUND_FACTOR = 2.0  # eager median / device median at which a row's eager time is host work


class GateError(Exception):
    """Nothing to gate (no rows, no samples), or two runs that must not be compared."""


@dataclass(frozen=True)
class RowSamples:
    name: str  # the benchmark's full name (test id), the same in both runs
    regime: str  # "device" or "eager"
    samples: tuple  # seconds per call
    threshold: Optional[float] = None  # the row's own threshold, where it set one
    # eager rows that are host-bound: the HOST_REFERENCE sample taken in turn with each sample
    reference: tuple = ()

    @property
    def key(self) -> tuple:
        return self.name, self.regime

    def relative_samples(self) -> tuple:
        """Each sample divided by the host reference taken with it."""
        return tuple(x / r for x, r in zip(self.samples, self.reference))


def row_samples(name: str, saved: dict, regimes: Sequence[str], threshold: Optional[float] = None
                ) -> list[RowSamples]:
    """RowSamples of one row from its saved samples ({regime: seconds, HOST_REFERENCE: seconds}),
    the eager ones with their host reference where the row is host-bound and it was kept for each."""
    rows = []
    reference = tuple(float(x) for x in saved.get(HOST_REFERENCE) or ())
    device = saved.get("device") or ()
    for regime in regimes:
        samples = tuple(float(x) for x in saved.get(regime) or ())
        host_bound = (regime == "eager" and samples and device and len(reference) == len(samples)
                      and min(reference) > 0
                      and statistics.median(samples) >= HOST_BOUND_FACTOR * statistics.median(device))
        rows.append(RowSamples(name, regime, samples, threshold, reference if host_bound else ()))
    return rows


@dataclass(frozen=True)
class Verdict:
    name: str
    regime: str
    ratio: float  # median(head) / median(base)
    low: float  # the confidence interval of the ratio
    high: float
    threshold: float
    base_median: float
    head_median: float
    base_spread: Optional[float]  # interquartile range / median
    head_spread: Optional[float]
    p_value: float  # Mann-Whitney U, or Wilcoxon signed-rank for paired samples; two-sided (shown, not used)
    basis: str = "samples"  # or "host-reference" (each sample divided by it) or "paired" (HEAD_i / BASE_i)
    pair_spread: Optional[float] = None  # paired: interquartile range / median of HEAD_i / BASE_i, what is judged

    @property
    def outcome(self) -> str:
        return outcome(self.low, self.high, self.threshold)


def outcome(low: float, high: float, threshold: float) -> str:
    """The verdict of an interval [low, high] of HEAD/BASE against ``threshold`` (see the module)."""
    if low > 1 + threshold / 2 and high >= 1 + threshold:
        return "regressed"
    if high < 1 - threshold / 2 and low <= 1 - threshold:
        return "improved"
    if high - low > threshold:
        return "unresolved"
    return "unchanged"


@dataclass
class GateResult:
    verdicts: list[Verdict] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)  # rows HEAD did not time
    only_head: list[str] = field(default_factory=list)
    too_few: list[str] = field(default_factory=list)  # rows with fewer than MIN_SAMPLES on a side
    gated: bool = True  # False: CPU timings, reported but not gated
    why_not_gated: str = ""

    @property
    def regressed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "regressed"]

    @property
    def improved(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "improved"]

    @property
    def unresolved(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.outcome == "unresolved"]

    @property
    def failed(self) -> bool:
        return self.gated and bool(self.regressed)


def parse_thresholds(items: Iterable[str]) -> dict:
    """``["device=0.05", "eager=0.1"]`` -> {regime: fraction}; ValueError saying what to write."""
    found = {}
    for item in items:
        regime, eq, value = str(item).partition("=")
        regime = regime.strip()
        try:
            fraction = float(value) if eq else float("nan")
        except ValueError:
            fraction = float("nan")
        if regime not in REGIMES or not 0 < fraction < 10:
            raise ValueError(f"{item!r}: write REGIME=FRACTION with REGIME device or eager and a fraction, "
                             "e.g. device=0.05")
        found[regime] = fraction
    return found


# -- statistics -------------------------------------------------------------------------------------------
def _percentile_interval(data: tuple, statistic, point: float, confidence: float, resamples: int, seed: int
                         ) -> tuple[float, float, float]:
    """(point, low, high): scipy.stats.bootstrap's percentile interval of ``statistic`` over ``data``
    (each array resampled on its own), widened to contain the point."""
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap(data, statistic, n_resamples=resamples, paired=False, vectorized=True, axis=-1,
                       confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return point, min(low, point), max(high, point)


def ratio_interval(base: Sequence[float], head: Sequence[float], confidence: float = CONFIDENCE,
                   resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(median(head)/median(base), low, high): the ratio of medians and its bootstrap confidence
    interval (scipy.stats.bootstrap, percentile method, independent resampling of each side)."""
    import numpy as np

    a, b = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    if a.size < 2 or b.size < 2 or np.median(a) <= 0:
        raise GateError(f"need at least 2 positive samples per side for an interval (got {a.size} and {b.size})")

    def ratio(x, y, axis=-1):
        return np.median(y, axis=axis) / np.median(x, axis=axis)

    point = float(ratio(a, b))
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no variation at all: the interval is the point
        return point, point, point
    return _percentile_interval((a, b), ratio, point, confidence, resamples, seed)


def paired_ratio_interval(base: Sequence[float], head: Sequence[float], confidence: float = CONFIDENCE,
                          resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(median of head_i / base_i, low, high) for samples taken in turn, pair i at one moment: the
    bootstrap confidence interval of that median (scipy.stats.bootstrap, percentile method)."""
    import numpy as np

    a, b = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    if a.size != b.size or a.size < 2 or (a <= 0).any():
        raise GateError(f"need two sets of at least 2 positive samples, paired (got {a.size} and {b.size})")
    ratios = b / a
    point = float(np.median(ratios))
    if np.ptp(ratios) == 0:
        return point, point, point
    return _percentile_interval((ratios,), np.median, point, confidence, resamples, seed)


def wilcoxon_p(base: Sequence[float], head: Sequence[float]) -> float:
    """Wilcoxon signed-rank p-value of log(head_i / base_i) (paired samples)."""
    import numpy as np
    from scipy.stats import wilcoxon

    try:
        return float(wilcoxon(np.log(np.asarray(head, dtype=float) / np.asarray(base, dtype=float))).pvalue)
    except ValueError:  # every pair equal
        return 1.0


def mann_whitney_p(base: Sequence[float], head: Sequence[float]) -> float:
    from scipy.stats import mannwhitneyu

    try:
        return float(mannwhitneyu(base, head, alternative="two-sided").pvalue)
    except ValueError:  # all values identical
        return 1.0


def verdict(base: RowSamples, head: RowSamples, thresholds: Optional[dict] = None, paired: bool = False) -> Verdict:
    """The row's verdict. ``paired``: sample i of each side was taken at one moment (in turn), so
    the pairs' ratios are judged (when both sides have as many samples)."""
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    threshold = head.threshold if head.threshold is not None else (
        base.threshold if base.threshold is not None else thresholds[head.regime])
    pair_spread = None
    if paired and len(base.samples) == len(head.samples):
        a, b, basis = base.samples, head.samples, "paired"
        (ratio, low, high), p_value = paired_ratio_interval(a, b), wilcoxon_p(a, b)
        pair_spread = spread([y / x for x, y in zip(a, b)])
    else:
        relative = bool(base.reference) and bool(head.reference)
        a, b = (base.relative_samples(), head.relative_samples()) if relative else (base.samples, head.samples)
        basis = "host-reference" if relative else "samples"
        (ratio, low, high), p_value = ratio_interval(a, b), mann_whitney_p(a, b)
    return Verdict(head.name, head.regime, ratio, low, high, threshold, statistics.median(a), statistics.median(b),
                   spread(a), spread(b), p_value, basis, pair_spread)


def compare_rows(base: Iterable[RowSamples], head: Iterable[RowSamples], thresholds: Optional[dict] = None,
                 paired: Sequence[str] = ()) -> GateResult:
    """A verdict for every (row, regime) both sides timed; the regimes in ``paired`` were sampled
    in turn (see :func:`verdict`)."""
    base_rows, head_rows = {r.key: r for r in base}, {r.key: r for r in head}
    result = GateResult()
    for key in sorted(base_rows.keys() | head_rows.keys()):
        label = f"{key[0]} [{key[1]}]"
        if key not in head_rows:
            result.only_base.append(label)
        elif key not in base_rows:
            result.only_head.append(label)
        elif min(len(base_rows[key].samples), len(head_rows[key].samples)) < MIN_SAMPLES:
            result.too_few.append(label)
        else:
            result.verdicts.append(verdict(base_rows[key], head_rows[key], thresholds, key[1] in paired))
    return result


# -- saved runs -------------------------------------------------------------------------------------------
@dataclass
class SavedRun:
    path: str
    machine_info: dict
    rows: list[RowSamples]
    commit: str = ""


def rows_of(data: dict, *, all_regimes: bool = False) -> list[RowSamples]:
    """The gated samples of each row of one pytest-benchmark JSON document: the regime its
    pytest-benchmark statistics hold (extra_info "metric"), or every regime saved with
    ``all_regimes`` (``pytest-attn ab`` times both from one measurement)."""
    rows = []
    for bench in data.get("benchmarks") or []:
        info = bench.get("extra_info") or {}
        if "backend" not in info:
            continue  # not an attention benchmark
        name = str(bench.get("fullname") or bench.get("name") or "")
        metric = str(info.get("metric") or "device")
        saved = info.get("samples_s") or {}
        if not saved and (bench.get("stats") or {}).get("data"):  # --benchmark-save-data, no extra_info samples
            saved = {metric: bench["stats"]["data"]}
        regimes = [r for r in REGIMES if r in saved] if all_regimes else [metric]
        threshold = info.get("gate_threshold")
        rows += row_samples(name, saved, regimes, float(threshold) if threshold is not None else None)
    return rows


def load_saved(path, *, all_regimes: bool = False) -> SavedRun:
    """One saved run: a pytest-benchmark JSON file, or the newest JSON file in a folder
    (``.benchmarks`` or one of its machine folders)."""
    path = Path(path)
    if path.is_dir():
        found = sorted((p for p in path.rglob("*.json") if p.is_file()), key=lambda p: (p.stat().st_mtime, str(p)))
        if not found:
            raise GateError(f"{path} holds no saved run (*.json); save one with "
                            "`pytest -m attn_bench --benchmark-autosave` or --benchmark-json FILE")
        path = found[-1]
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise GateError(f"cannot read {path}: {exc.strerror or exc}; give a saved run (pytest --benchmark-json FILE)"
                        ) from None
    except ValueError:
        raise GateError(f"{path} is not JSON; give a file pytest-benchmark saved (--benchmark-json, "
                        "--benchmark-autosave)") from None
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise GateError(f"{path} is not a pytest-benchmark run (no 'benchmarks'); give a file from --benchmark-json "
                        "or --benchmark-autosave")
    rows = rows_of(data, all_regimes=all_regimes)
    if not rows:
        raise GateError(f"{path} holds no pytest-attn benchmark row; save one with "
                        "`pytest -m attn_bench --benchmark-autosave`")
    if not any(r.samples for r in rows):
        raise GateError(f"{path} keeps no timed samples (saved by an older pytest-attn?); rerun it, or save with "
                        "--benchmark-save-data")
    commit = str((data.get("commit_info") or {}).get("id") or "")
    return SavedRun(str(path), data.get("machine_info") or {}, rows, commit)


def gate(base: SavedRun, head: SavedRun, *, thresholds: Optional[dict] = None, gate_cpu: bool = False
         ) -> GateResult:
    """Compare two saved runs. Raises GateError naming what differs when their machines or
    versions do; CPU runs are compared but not gated unless ``gate_cpu``."""
    differ = differences(base.machine_info, head.machine_info)
    if differ:
        raise GateError("not compared: the runs differ in " + "; ".join(differ)
                        + " (timings from different machines or versions say nothing about a regression); "
                          "gate against a baseline saved on this machine with these versions")
    result = compare_rows(base.rows, head.rows, thresholds)
    if not result.verdicts:
        raise GateError("no row was timed in both runs with enough samples "
                        f"(base only: {len(result.only_base)}, head only: {len(result.only_head)}, "
                        f"too few samples: {len(result.too_few)}); gate two runs of the same benchmarks")
    if is_cpu_run(head.machine_info) and not gate_cpu:
        result.gated = False
        result.why_not_gated = "CPU timings are reported, not gated (a CPU runner's noise is not a regression); " \
                               "--attn-gate-cpu / --gate-cpu gates them"
    return result


# -- the table ----------------------------------------------------------------------------------------------
def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.1%}"


def table(verdicts: Sequence[Verdict]) -> list[str]:
    """One line per verdict: ratio, interval, threshold, regime, spread of each side, the p-value
    (Mann-Whitney U; Wilcoxon signed-rank for paired samples; shown, not used), outcome."""
    if not verdicts:
        return []
    width = max(12, max(len(v.name) for v in verdicts))
    spreads = [f"{_pct(v.base_spread)}/{_pct(v.head_spread)}" + ("" if v.pair_spread is None else
                                                                 f" pairs {_pct(v.pair_spread)}") for v in verdicts]
    spread_width = max(16, max(map(len, spreads)))
    head = (f"{'row':<{width}}  {'regime':<6}  {'ratio':>6}  {'95% interval':>15}  {'threshold':>9}  "
            f"{'spread base/head':>{spread_width}}  {'p':>7}  verdict")
    lines = [head, "-" * len(head)]
    for v, spread_cell in zip(verdicts, spreads):
        regime = v.regime if v.basis == "samples" else f"{v.regime}*"
        lines.append(f"{v.name:<{width}}  {regime:<6}  {v.ratio:>6.3f}  {f'[{v.low:.3f}, {v.high:.3f}]':>15}  "
                     f"{f'+{v.threshold:.0%}':>9}  {spread_cell:>{spread_width}}  "
                     f"{v.p_value:>7.3g}  {v.outcome.upper() if v.outcome != 'unchanged' else v.outcome}")
    bases = {v.basis for v in verdicts}
    if "host-reference" in bases:
        lines.append("eager*: a host-bound row; each sample divided by the host reference timed in turn with it, "
                     "so the host's drift cancels")
    if "paired" in bases:
        lines.append("eager*: the two sides sampled in turn; the ratio is the median of HEAD_i / BASE_i, pair by pair, "
                     "so the host's drift cancels (pairs: the spread of those ratios; p: Wilcoxon signed-rank)")
    return lines


UNRESOLVED_ADVICE = "take more samples, or time both sides in turn with pytest-attn ab"


def summary_line(result: GateResult, base_label: str, unresolved_advice: str = UNRESOLVED_ADVICE) -> str:
    n = len(result.verdicts)
    regressed, improved = len(result.regressed), len(result.improved)
    unresolved = (f"; {len(result.unresolved)} unresolved (an interval wider than the threshold: {unresolved_advice})"
                  if result.unresolved else "")
    extra = []
    if result.too_few:
        extra.append(f"{len(result.too_few)} with too few samples")
    if result.only_base:
        extra.append(f"{len(result.only_base)} only in the baseline")
    if result.only_head:
        extra.append(f"{len(result.only_head)} new")
    tail = f"; not compared: {', '.join(extra)}" if extra else ""
    if not result.gated:
        return (f"pytest-attn gate: NOT GATED: {result.why_not_gated}. {regressed} of {n} rows would have regressed "
                f"against {base_label}{unresolved}{tail}")
    if regressed:
        return (f"pytest-attn gate: FAILED: {regressed} of {n} rows regressed against {base_label} (their "
                f"{CONFIDENCE:.0%} interval past half the threshold, reaching it); {improved} improved{unresolved}{tail}")
    return (f"pytest-attn gate: passed: 0 of {n} rows regressed against {base_label}; {improved} improved"
            f"{unresolved}{tail}")
