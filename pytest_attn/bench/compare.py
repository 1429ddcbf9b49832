"""Reading saved pytest-benchmark runs (``--benchmark-autosave`` / ``--benchmark-json`` files):
where one backend overtakes another along a sequence-length sweep, per run (commit), in both
regimes a model pays ("device": device time under CUDA-graph replay, and "eager": wall time per call, host
overhead included: each row's extra_info carries both), and a plot of µs per token against seq_len
with one panel per regime.

Runs from different GPUs are never mixed: they are reported in separate sections (and separate
panels of the plot), with a warning, or refused with ``require_same_device``.

Where the spread of the medians is known (each row's interquartile range), a seq_len at which two
backends' medians lie closer than their spread is too close to call: it neither makes nor breaks a
lead, and the crossovers say so, so that noise does not read as one backend overtaking another.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pytest_attn.bench.machine import machine_key


class CompareError(Exception):
    """Nothing usable to compare, or runs from different devices where one device was required."""


REGIMES = ("device", "eager")  # the same two words as --attn-bench-metric and extra_info["metric"]
REGIME_TITLES = {"device": "device time, CUDA-graph replay",
                 "eager": "eager wall time per call (host overhead included)"}
OLD_REGIME_NAMES = {"graph": "device"}  # what "device" was called before 0.2 (one release)


def regime_name(regime: str) -> str:
    return OLD_REGIME_NAMES.get(regime, regime)


@dataclass(frozen=True)
class Row:
    backend: str
    series: str  # what is swept, with the layer's shape: "vit-table h16/16xd80 bfloat16 full"
    seq_len: Optional[int]  # the sweep's x; None for rows that are not one sequence
    tokens: int
    median_s: float  # of what pytest-benchmark recorded (the row's metric)
    name: str
    device_s: Optional[float] = None  # the row's own figures of each regime (extra_info)
    eager_s: Optional[float] = None
    spread: Optional[float] = None  # interquartile range / median of pytest-benchmark's samples (the row's metric)
    metric: str = "device"  # the regime pytest-benchmark's samples hold: "device" or "eager"

    @property
    def us_per_token(self) -> float:
        return self.median_s * 1e6 / max(1, self.tokens)

    def regime_s(self, regime: str) -> Optional[float]:
        """Median seconds per call in ``regime``: "device" or "eager"."""
        return self.device_s if regime_name(regime) == "device" else self.eager_s

    def regime_spread(self, regime: str) -> Optional[float]:
        """The interquartile range / median in ``regime``, where this row's samples are of it."""
        return self.spread if regime_name(regime) == self.metric else None


@dataclass
class Run:
    path: Path
    commit: str
    label: str  # short commit (+dirty), made unique among the runs compared
    when: str
    machine: str  # machine_key: the GPU, or the CPU
    attn: dict
    rows: list[Row] = field(default_factory=list)


@dataclass(frozen=True)
class Crossover:
    faster_before: str
    faster_after: str
    seq_len: int  # the first seq_len at which faster_after is faster
    previous_seq_len: int


def find_json_files(paths: Iterable) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*.json") if q.is_file()))
        elif p.is_file():
            found.append(p)
        else:
            raise CompareError(f"{p} does not exist; give saved benchmark JSON files or a folder of them "
                               "(pytest --benchmark-autosave writes them under .benchmarks/)")
    return found


def load_run(path: Path) -> Optional[Run]:
    """A run from one pytest-benchmark JSON file; None when the file is not one (or has no attn rows)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "benchmarks" not in data:
        return None
    commit_info = data.get("commit_info") or {}
    commit = str(commit_info.get("id") or "nocommit")
    is_sha = len(commit) >= 12 and all(c in "0123456789abcdef" for c in commit.lower())
    label = (commit[:8] if is_sha else commit) + ("+dirty" if commit_info.get("dirty") else "")
    machine_info = data.get("machine_info") or {}
    run = Run(Path(path), commit, label, str(data.get("datetime", "")), machine_key(machine_info),
              machine_info.get("attn") or {})
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        stats = bench.get("stats") or {}
        if "backend" not in info or "median" not in stats:
            continue
        seq_len = info.get("seq_len")
        median = float(stats["median"])
        device = info.get("device_ms")
        eager = info.get("eager_ms")
        run.rows.append(Row(info["backend"], info.get("series", bench.get("group") or ""),
                            int(seq_len) if seq_len is not None else None, int(info.get("tokens") or 1),
                            median, bench.get("fullname", bench.get("name", "")),
                            device / 1e3 if device is not None else (median if info.get("metric", "device") == "device"
                                                                      else None),
                            eager / 1e3 if eager is not None else None,
                            _spread(stats), str(info.get("metric", "device"))))
    return run if run.rows else None


def _spread(stats: dict) -> Optional[float]:
    """pytest-benchmark's interquartile range as a share of its median (None where not recorded)."""
    try:
        iqr, median = float(stats["iqr"]), float(stats["median"])
    except (KeyError, TypeError, ValueError):
        return None
    return iqr / median if median > 0 and math.isfinite(iqr) and iqr >= 0 else None


def load_runs(paths: Iterable) -> list[Run]:
    runs = [r for r in (load_run(p) for p in find_json_files(paths)) if r is not None]
    if not runs:
        raise CompareError("no pytest-attn benchmark rows found; save runs with "
                           "`pytest -m attn_bench --benchmark-autosave` (or --benchmark-json FILE) first")
    runs.sort(key=lambda r: (r.when, str(r.path)))
    seen: dict[str, int] = defaultdict(int)
    for run in runs:  # the same commit run twice: label the runs apart
        seen[run.label] += 1
        if seen[run.label] > 1:
            run.label = f"{run.label}#{seen[run.label]}"
    return runs


def by_machine(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.machine].append(run)
    return dict(groups)


def sweeps(run: Run, regime: str = "device") -> dict[str, dict[str, dict[int, float]]]:
    """series -> backend -> seq_len -> µs per token in ``regime`` (rows along a one-sequence sweep
    only, and only rows that measured that regime)."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for row in run.rows:
        seconds = row.regime_s(regime)
        if row.seq_len is not None and seconds is not None:
            out[row.series][row.backend][row.seq_len] = seconds * 1e6 / max(1, row.tokens)
    return out


def spreads(run: Run, regime: str = "device") -> dict[str, dict[str, dict[int, float]]]:
    """series -> backend -> seq_len -> interquartile range / median, for the points of ``sweeps``
    whose spread was recorded in ``regime``."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for row in run.rows:
        spread = row.regime_spread(regime)
        if row.seq_len is not None and row.regime_s(regime) is not None and spread is not None:
            out[row.series][row.backend][row.seq_len] = spread
    return out


Spreads = Optional[dict[int, float]]  # seq_len -> interquartile range / median


def too_close(time_a: float, spread_a: Optional[float], time_b: float, spread_b: Optional[float]) -> bool:
    """Whether two medians are closer than half their interquartile ranges together (the middle
    halves of their samples overlap, taking each as centred on its median): then which is faster is
    noise. Equal medians are always too close; an unknown spread counts as none."""
    half_ranges = (time_a * (spread_a or 0.0) + time_b * (spread_b or 0.0)) / 2
    return abs(time_a - time_b) <= half_ranges


def crossovers(a: str, times_a: dict[int, float], b: str, times_b: dict[int, float],
               spread_a: Spreads = None, spread_b: Spreads = None) -> list[Crossover]:
    """Every seq_len (common to both) at which the faster backend changes, in increasing order. A
    seq_len too close to call (see too_close) is passed over: it neither starts nor ends a lead."""
    found, leader, leader_x = [], None, None
    for x in sorted(set(times_a) & set(times_b)):
        if too_close(times_a[x], (spread_a or {}).get(x), times_b[x], (spread_b or {}).get(x)):
            continue
        now = a if times_a[x] < times_b[x] else b
        if leader is not None and now != leader:
            found.append(Crossover(leader, now, x, leader_x))
        leader, leader_x = now, x
    return found


def describe_pair(a: str, times_a: dict[int, float], b: str, times_b: dict[int, float],
                  spread_a: Spreads = None, spread_b: Spreads = None) -> str:
    """One line: where the lead changes between a and b (with the medians and their spread at each
    change where the spread is known), or who is faster throughout; seq_lens too close to call are
    named."""
    xs = sorted(set(times_a) & set(times_b))
    if not xs:
        return f"{a} vs {b}: no seq_len in common"
    spread_a, spread_b = spread_a or {}, spread_b or {}
    close = [x for x in xs if too_close(times_a[x], spread_a.get(x), times_b[x], spread_b.get(x))]
    decided = [x for x in xs if x not in close]
    tail = f"; too close to call at {', '.join(map(str, close))} (medians within their spread)" if close else ""
    if not decided:
        return f"{a} vs {b}: too close to call at every seq_len ({xs[0]}..{xs[-1]}); no crossover"
    found = crossovers(a, times_a, b, times_b, spread_a, spread_b)
    if not found:
        faster = a if times_a[decided[0]] < times_b[decided[0]] else b
        where = "every seq_len" if not close else "every seq_len it is decided at"
        return f"{a} vs {b}: {faster} is faster at {where} ({xs[0]}..{xs[-1]}); no crossover{tail}"

    def iqr(spread: dict[int, float], x: int) -> str:
        return f"IQR {spread[x]:.0%}" if x in spread else "IQR unknown"

    def at(x: int) -> str:
        if x not in spread_a and x not in spread_b:
            return ""
        return (f" [µs/token at {x}: {a} {times_a[x]:.4g} ({iqr(spread_a, x)}), "
                f"{b} {times_b[x]:.4g} ({iqr(spread_b, x)})]")

    parts = [f"{c.faster_after} overtakes {c.faster_before} at seq_len {c.seq_len} (after {c.previous_seq_len})"
             f"{at(c.seq_len)}" for c in found]
    return f"{a} vs {b}: " + "; ".join(parts) + tail


def report(runs: list[Run]) -> tuple[str, bool]:
    """(text, mixed): the crossovers of each run, one section per device."""
    groups = by_machine(runs)
    lines = []
    mixed = len(groups) > 1
    if mixed:
        lines.append("WARNING: these runs come from {} different devices ({}); they are compared only within "
                     "each device.".format(len(groups), "; ".join(groups)))
    for machine, machine_runs in groups.items():
        lines.append(f"== {machine}: {len(machine_runs)} run(s) ==")
        for run in machine_runs:
            versions = ", ".join(f"{k} {run.attn[k]}" for k in ("torch", "cuda", "flashinfer") if run.attn.get(k))
            lines.append(f"run {run.label} ({run.when or 'no date'}; {run.path.name}){': ' + versions if versions else ''}")
            if not any(sweeps(run, regime) for regime in REGIMES):
                lines.append("  (no seq_len sweep in this run)")
            for regime in REGIMES:
                spread = spreads(run, regime)
                for name, per_backend in sorted(sweeps(run, regime).items()):
                    lines.append(f"  [{regime}: {REGIME_TITLES[regime]}] {name}: "
                                 + ", ".join(f"{n} ({len(per_backend[n])} sizes)" for n in sorted(per_backend)))
                    lines.extend("    " + line for line in pair_lines(per_backend, spread.get(name)))
    return "\n".join(lines), mixed


def pair_lines(per_backend: dict[str, dict[int, float]],
               spread: Optional[dict[str, dict[int, float]]] = None) -> list[str]:
    """describe_pair for every pair of backends (or why there is nothing to compare); ``spread``:
    backend -> seq_len -> interquartile range / median, where known."""
    names = sorted(per_backend)
    if len(names) < 2:
        return ["one backend only: nothing to compare"]
    spread = spread or {}
    return [describe_pair(a, per_backend[a], b, per_backend[b], spread.get(a), spread.get(b))
            for i, a in enumerate(names) for b in names[i + 1:]]


def plot(runs: list[Run], out: Path) -> Path:
    """µs per token against seq_len, one line per (backend, run), one panel per (device, series,
    regime): device time on the left, eager on the right."""
    panels = []
    for machine, machine_runs in by_machine(runs).items():
        names = sorted({s for run in machine_runs for regime in REGIMES for s in sweeps(run, regime)})
        for series in names:
            for regime in REGIMES:
                lines = {f"{backend} @ {run.label}": points for run in machine_runs
                         for backend, points in sorted(sweeps(run, regime).get(series, {}).items())}
                if lines:
                    panels.append((f"{series} [{regime}: {REGIME_TITLES[regime]}]\n{machine}", lines))
    if not panels:
        raise CompareError("nothing to plot: no run has a seq_len sweep; save one of the ViT table "
                           "(pytest -m attn_bench -k test_vit_table --benchmark-autosave)")
    return draw_panels(panels, out)


def draw_panels(panels: list[tuple[str, dict[str, dict[int, float]]]], out: Path) -> Path:
    """One panel per (title, {line label: {seq_len: µs per token}}), two to a row."""
    from pytest_attn.bench.figures import panel_grid

    with panel_grid(len(panels), out, panel_height=4.5, dpi=110) as axes:
        for ax, (title, lines) in zip(axes, panels):
            for label, points in lines.items():
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("seq_len (tokens)")
            ax.set_ylabel("µs per token (median)")
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    return Path(out)
