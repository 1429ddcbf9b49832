"""Each row's median and confidence interval across saved runs, and where it stepped.

A run is one saved pytest-benchmark JSON file (``.benchmarks``, oldest first by its date). For each
row (benchmark name and regime) and run: the median of its samples and a bootstrap confidence
interval of the median (scipy.stats.bootstrap, percentile method). Step detection, asv-style and
deliberately simple: between two consecutive runs of a row, a **step** is where their intervals do
not overlap and the medians differ by more than the regime's threshold (pytest_attn.bench.gate's);
a step up is a regression, a step down an improvement. A row regressed when its last step is up
(and nothing has brought it back below the threshold since). No pytest, no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pytest_attn.bench.gate import BOOTSTRAP_SEED, CONFIDENCE, DEFAULT_THRESHOLDS, RESAMPLES, GateError, rows_of


@dataclass(frozen=True)
class Point:
    run: str  # the run's label (commit and date)
    median: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Step:
    before: Point
    after: Point
    threshold: float

    @property
    def ratio(self) -> float:
        return self.after.median / self.before.median

    @property
    def direction(self) -> str:
        return "up (slower)" if self.ratio > 1 else "down (faster)"


@dataclass
class Series:
    name: str
    regime: str
    points: list[Point] = field(default_factory=list)
    threshold: Optional[float] = None

    def steps(self, thresholds: Optional[dict] = None) -> list[Step]:
        threshold = self.threshold if self.threshold is not None else {**DEFAULT_THRESHOLDS,
                                                                         **(thresholds or {})}[self.regime]
        found = []
        for before, after in zip(self.points, self.points[1:]):
            apart = after.low > before.high or after.high < before.low
            if apart and abs(after.median / before.median - 1) > threshold:
                found.append(Step(before, after, threshold))
        return found

    def regressed(self, thresholds: Optional[dict] = None) -> bool:
        """The last step is up and the newest run is still past the threshold of the run before it."""
        steps = self.steps(thresholds)
        if not steps or steps[-1].ratio <= 1:
            return False
        last = self.points[-1]
        return last.median > steps[-1].before.median * (1 + steps[-1].threshold)


def median_interval(samples) -> tuple[float, float, float]:
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(samples, dtype=float)
    median = float(np.median(data))
    if data.size < 2 or np.ptp(data) == 0:
        return median, median, median
    result = bootstrap((data,), np.median, n_resamples=RESAMPLES, vectorized=True, axis=-1, method="percentile",
                       confidence_level=CONFIDENCE, rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return median, min(median, low), max(median, high)


def load_history(paths: Iterable) -> list[Series]:
    """Every row's series over the saved runs under ``paths`` (files or folders), oldest run first."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p in path.rglob("*.json") if p.is_file()]
        elif path.is_file():
            files.append(path)
        else:
            raise GateError(f"{path} does not exist; give .benchmarks (written by --benchmark-autosave) or saved runs")
    runs = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "benchmarks" in data:
            commit = str((data.get("commit_info") or {}).get("id") or "")[:8] or path.stem
            runs.append((str(data.get("datetime", "")), str(path), f"{commit} {str(data.get('datetime', ''))[:16]}",
                         rows_of(data)))
    runs.sort()
    series: dict = {}
    for _, _, label, rows in runs:
        for row in rows:
            if len(row.samples) < 2:
                continue
            entry = series.setdefault(row.key, Series(row.name, row.regime, threshold=row.threshold))
            entry.points.append(Point(label, *median_interval(row.samples), len(row.samples)))
    if not series:
        raise GateError("no saved run with timed samples found; save runs with "
                        "`pytest -m attn_bench --benchmark-autosave` (pytest-attn keeps every sample)")
    return [series[k] for k in sorted(series)]


def lines(history: list[Series], thresholds: Optional[dict] = None) -> list[str]:
    out = []
    for entry in history:
        steps = {id(s.after): s for s in entry.steps(thresholds)}
        flag = "  REGRESSED" if entry.regressed(thresholds) else ""
        out.append(f"{entry.name} [{entry.regime}]{flag}")
        for point in entry.points:
            step = steps.get(id(point))
            mark = f"  <- step {step.direction}, x{step.ratio:.3f}" if step else ""
            out.append(f"  {point.run:<26} median {point.median * 1e3:10.4f} ms  "
                       f"[{point.low * 1e3:.4f}, {point.high * 1e3:.4f}]  n={point.n}{mark}")
    return out


def plot(history: list[Series], out) -> Path:
    """One panel per row: median with its interval per run (matplotlib)."""
    from pytest_attn.bench.figures import panel_grid

    with panel_grid(len(history), out, panel_height=3.5, dpi=100) as axes:
        for ax, entry in zip(axes, history):
            xs = list(range(len(entry.points)))
            med = [p.median * 1e3 for p in entry.points]
            err = [[(p.median - p.low) * 1e3 for p in entry.points],
                   [(p.high - p.median) * 1e3 for p in entry.points]]
            ax.errorbar(xs, med, yerr=err, marker="o", capsize=3)
            for step in entry.steps():
                x = entry.points.index(step.after)
                ax.axvline(x - 0.5, color="red" if step.ratio > 1 else "green", alpha=0.4)
            ax.set_xticks(xs, [p.run for p in entry.points], rotation=30, fontsize=7, ha="right")
            ax.set_ylabel("ms per call (median)")
            ax.set_title(f"{entry.name} [{entry.regime}]", fontsize=8)
    return Path(out)


def regressed_rows(history: list[Series], thresholds: Optional[dict] = None) -> list[str]:
    return [f"{s.name} [{s.regime}]" for s in history if s.regressed(thresholds)]
