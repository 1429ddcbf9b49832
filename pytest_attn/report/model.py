"""What a report shows, computed from a run's data (the ``.json`` that ``--attn-report`` writes, or
a pytest-benchmark file): the support matrix (backends by the catalog's dimensions, each cell the
tests that passed of those that ran, with skips by kind and failures marked), its footnotes (skip
reasons grouped, with counts), the failures, the benchmark tables (through
:mod:`pytest_attn.bench.compare`), and two runs side by side. Nothing here renders, nor imports torch.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPORT_FORMAT = "pytest-attn-report"  # the .json's "format"; its "version" changes when a key changes meaning
REPORT_VERSION = 1
REPORT_SUFFIXES = {".html": "html", ".htm": "html", ".md": "md", ".json": "json"}
#: Why a test was skipped, most telling first (run_report.classify_reason decides).
SKIP_KINDS = ("known-failure", "hazard", "unsupported", "jit-budget", "unavailable", "other")
#: Each mark of a cell: (symbol, what it means).
MARKS = {
    "failed": ("✗", "failed"),
    "known-failure": ("⚑", "expected to fail: a listed known failure that still fails, or is not run because "
                           "it crashes (an xfail; its entry in the known-failures files)"),
    "hazard": ("⚠", "skipped as a known hazard: running it is known to give a wrong result or crash "
                    "(measured, or an upstream issue)"),
    "unsupported": ("⊘", "skipped: the backend does not support it"),
    "jit-budget": ("◷", "skipped: its kernel is not built in this run (JIT budget)"),
    "unavailable": ("∅", "skipped: the backend or the device is not available here"),
    "other": ("◌", "skipped for another reason"),
}
ALL_ROW = "all tests"
NO_CASE_ROW = "tests without a catalog case"
NO_BACKEND = "(other tests)"  # the column of attention tests that run no one backend (the differential)


class ReportError(Exception):
    """A file that is not a pytest-attn report nor a pytest-benchmark file, or nothing to report."""


# -- loading --------------------------------------------------------------------------------------
def load_run(path) -> dict:
    """A run's data from a report .json, or from a pytest-benchmark file (benchmarks only)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ReportError(f"{path}: not JSON ({exc})") from None
    if isinstance(data, dict) and data.get("format") == REPORT_FORMAT:
        if int(data.get("version", 0)) > REPORT_VERSION:
            raise ReportError(f"{path}: written by a newer pytest-attn (report version {data['version']}, this one "
                              f"reads up to {REPORT_VERSION}); upgrade pytest-attn")
        return data
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "machine_info" in data:
        return from_benchmark_file(data)
    raise ReportError(f"{path}: neither a pytest-attn report (--attn-report=FILE.json) nor a pytest-benchmark file "
                      "(--benchmark-json / --benchmark-autosave)")


def attn_rows(benchmark_file: dict) -> list[dict]:
    """A pytest-benchmark file's pytest-attn rows (those whose extra_info names a backend)."""
    rows = []
    for row in benchmark_file.get("benchmarks") or []:
        if not isinstance(row, dict):
            continue
        if "backend" in (row.get("extra_info") or {}) and "median" in (row.get("stats") or {}):
            rows.append({k: v for k, v in row.items() if k not in ("params", "stats")}
                        | {"stats": {k: v for k, v in row["stats"].items() if k != "data"}})
    return rows


def from_benchmark_file(data: dict) -> dict:
    """A run with no test outcomes, only the benchmark rows and the machine they ran on."""
    machine_info = data.get("machine_info") or {}
    attn = dict(machine_info.get("attn") or {})
    cpu = machine_info.get("cpu") if isinstance(machine_info.get("cpu"), dict) else {}
    commit = data.get("commit_info") or {}
    attn.update({"commit": commit.get("id"), "started": data.get("datetime"), "source": "pytest-benchmark",
                 "cpu": cpu.get("brand_raw") or machine_info.get("processor")})
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "environment": attn, "tests": [],
            "benchmarks": attn_rows(data)}


def with_benchmarks(run: dict, paths) -> dict:
    """``run`` with the pytest-attn rows of these pytest-benchmark files (or folders) as its benchmarks."""
    from pytest_attn.bench.compare import CompareError, find_json_files

    try:
        files = find_json_files(paths)
    except CompareError as exc:
        raise ReportError(str(exc)) from None
    rows = []
    for path in files:
        try:
            rows += attn_rows(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            continue
    if not rows:
        raise ReportError(f"no pytest-attn benchmark rows in {', '.join(map(str, paths))}: save them with "
                          "`pytest -m attn_bench --benchmark-json FILE` (or --benchmark-autosave)")
    return {**run, "benchmarks": rows}


# -- the matrix -----------------------------------------------------------------------------------
@dataclass
class Cell:
    passed: int = 0
    failed: int = 0
    skipped: Counter = field(default_factory=Counter)  # kind -> tests
    notes: list[int] = field(default_factory=list)  # footnote numbers of its skip reasons
    failures: list[int] = field(default_factory=list)  # numbers of its failures

    @property
    def ran(self) -> int:
        return self.passed + self.failed

    @property
    def total(self) -> int:
        return self.ran + sum(self.skipped.values())

    @property
    def status(self) -> str:
        """fail, pass (all ran and passed), partial (passed, some skipped), hazard (none ran, a
        hazard among the skips), skip (none ran), or empty."""
        if self.failed:
            return "fail"
        if self.passed:
            return "partial" if self.skipped else "pass"
        if self.skipped:
            return "hazard" if self.skipped["hazard"] else "skip"
        return "empty"

    def marks(self) -> list[tuple[str, int, str]]:
        """(kind, count, symbol) of its failures and each kind of skip, most telling first."""
        counts = [("failed", self.failed)] + [(kind, self.skipped[kind]) for kind in SKIP_KINDS]
        return [(kind, n, MARKS[kind][0]) for kind, n in counts if n]

    def text(self) -> str:
        """'5/6 ✗1 ⚠2': passed of run, then each mark with its count; '–' when nothing was collected."""
        if not self.total:
            return "–"
        return " ".join([f"{self.passed}/{self.ran}"] + [f"{symbol}{n}" for _, n, symbol in self.marks()])

    def add(self, test: dict) -> None:
        if test["outcome"] == "passed":
            self.passed += 1
        elif test["outcome"] == "failed":
            self.failed += 1
        elif test["outcome"] == "skipped":
            self.skipped[test.get("kind") or "other"] += 1


@dataclass
class Row:
    label: str
    cases: int  # distinct catalog cases in the row
    cells: dict[str, Cell]


@dataclass
class Note:
    """One skip reason of one backend, with how many tests it skipped."""

    number: int
    backend: str
    kind: str
    reason: str
    count: int


@dataclass
class Failure:
    number: int
    backend: str
    case: Optional[str]
    test: str
    nodeid: str
    summary: str
    when: str
    step: Optional[int]
    layer: Optional[int]
    batch: Optional[str]
    plan: Optional[str]
    layer_spec: Optional[str]
    rerun: str
    text: str

    @property
    def where(self) -> str:
        if self.step is None:
            return "" if self.when == "call" else f"in {self.when}"
        return f"step {self.step}" + ("" if self.layer is None else f", layer {self.layer}")


@dataclass
class RunView:
    env: dict
    backends: list[str]
    rows: list[Row]
    notes: list[Note]
    failures: list[Failure]
    totals: Counter  # outcome -> tests
    backend_totals: dict[str, Counter]
    durations: dict[str, float]  # backend -> seconds of its tests
    bench: Optional["BenchView"]
    kernels: Optional[dict]
    determinism: Optional[dict]

    def notes_by_backend(self) -> dict[str, list[Note]]:
        grouped: dict[str, list[Note]] = {}
        for note in self.notes:
            grouped.setdefault(note.backend, []).append(note)
        return grouped


def _backend(test: dict) -> str:
    return test.get("backend") or NO_BACKEND


def _backends(run: dict, tests: list[dict]) -> list[str]:
    named = [b for b in (run.get("environment") or {}).get("backends") or [] if any(_backend(t) == b for t in tests)]
    rest = sorted({_backend(t) for t in tests} - set(named) - {NO_BACKEND})
    return named + rest + ([NO_BACKEND] if any(_backend(t) == NO_BACKEND for t in tests) else [])


def _row_labels(run: dict, tests: list[dict]) -> list[str]:
    seen = {tag for t in tests for tag in t.get("tags") or ()}
    ordered = [tag for tag in run.get("dimensions") or [] if tag in seen]
    labels = [ALL_ROW] + ordered + sorted(seen - set(ordered))
    if any(not t.get("case") for t in tests):
        labels.append(NO_CASE_ROW)
    return labels


def _rows_of(test: dict) -> list[str]:
    return [ALL_ROW] + (list(test.get("tags") or ()) if test.get("case") else [NO_CASE_ROW])


def build(run: dict) -> RunView:
    """The report's view of one run's data."""
    tests = [t for t in run.get("tests") or [] if t.get("outcome")]
    backends = _backends(run, tests)
    order = {b: i for i, b in enumerate(backends)}
    tests.sort(key=lambda t: (order[_backend(t)], t["nodeid"]))
    notes = _notes(tests, order)
    note_number = {(n.backend, n.kind, n.reason): n.number for n in notes}
    failures = _failures(tests)
    failure_number = {f.nodeid: f.number for f in failures}
    labels = _row_labels(run, tests)
    cells = {label: {b: Cell() for b in backends} for label in labels}
    cases: dict[str, set] = {label: set() for label in labels}
    for test in tests:
        backend = _backend(test)
        for label in _rows_of(test):
            cell = cells[label][backend]
            cell.add(test)
            if test.get("case"):
                cases[label].add(test["case"])
            if test["outcome"] == "skipped":
                number = note_number[(backend, test.get("kind") or "other", test.get("reason") or "")]
                if number not in cell.notes:
                    cell.notes.append(number)
            elif test["outcome"] == "failed":
                cell.failures.append(failure_number[test["nodeid"]])
    for row in cells.values():
        for cell in row.values():
            cell.notes.sort()
    backend_totals = {b: Counter(t["outcome"] for t in tests if _backend(t) == b) for b in backends}
    durations = {b: sum(float(t.get("duration_s") or 0) for t in tests if _backend(t) == b) for b in backends}
    env = {key: None for key, _ in ENV_FIELDS} | {"problems": [], "unavailable": {}} | (run.get("environment") or {})
    return RunView(env, backends,
                   [Row(label, len(cases[label]), cells[label]) for label in labels], notes, failures,
                   Counter(t["outcome"] for t in tests), backend_totals, durations, bench_view(run),
                   run.get("kernels"), run.get("determinism"))


def _notes(tests: list[dict], order: dict[str, int]) -> list[Note]:
    """Skip reasons grouped per backend and kind, most frequent first, numbered in that order."""
    counts = Counter((_backend(t), t.get("kind") or "other", t.get("reason") or "") for t in tests
                     if t["outcome"] == "skipped")
    keys = sorted(counts, key=lambda k: (order[k[0]], SKIP_KINDS.index(k[1]) if k[1] in SKIP_KINDS else 99,
                                         -counts[k], k[2]))
    return [Note(i + 1, backend, kind, reason, counts[(backend, kind, reason)])
            for i, (backend, kind, reason) in enumerate(keys)]


def _failures(tests: list[dict]) -> list[Failure]:
    found = []
    for test in tests:
        if test["outcome"] != "failed":
            continue
        f = test.get("failure") or {}
        found.append(Failure(len(found) + 1, _backend(test), test.get("case"), test.get("test") or "", test["nodeid"],
                             f.get("summary") or "failed", f.get("when") or "call", f.get("step"), f.get("layer"),
                             f.get("batch"), f.get("plan"), f.get("layer_spec"), test.get("rerun") or "",
                             f.get("text") or ""))
    return found


def matrix_json(view: RunView) -> dict:
    """backend -> row -> {passed, failed, skipped: {kind: n}}: the matrix, for tools."""
    return {b: {row.label: {"passed": row.cells[b].passed, "failed": row.cells[b].failed,
                            "skipped": dict(row.cells[b].skipped)}
                for row in view.rows if row.cells[b].total}
            for b in view.backends}


# -- the environment ------------------------------------------------------------------------------
#: (key, label) of the environment, in the order shown.
ENV_FIELDS = (
    ("gpu", "GPU"), ("gpu_capability", "compute capability"), ("driver", "driver"), ("cuda", "CUDA"),
    ("cudnn", "cuDNN"), ("torch", "torch"), ("flashinfer", "FlashInfer"), ("triton", "Triton"),
    ("cudnn_frontend", "cuDNN frontend"), ("tensorrt_llm", "TensorRT-LLM"), ("device", "device"), ("cpu", "CPU"),
    ("python", "Python"), ("pytest", "pytest"), ("pytest_attn", "pytest-attn"), ("commit", "commit"),
    ("seed", "seed"), ("dtypes", "dtypes"), ("strict", "strict"), ("max_tokens", "max tokens"),
    ("case_filter", "cases"), ("workers", "xdist workers"), ("isolate", "isolated"), ("started", "started"),
    ("duration_s", "duration (s)"), ("exit_status", "exit status"), ("command", "command"),
    ("source", "source"), ("error", "problem"),
)


def shown(value) -> Optional[str]:
    """A value as the report prints it; None for nothing to show."""
    if value is None or value == [] or value == {} or value == "":
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def env_rows(env: dict) -> list[tuple[str, str]]:
    """(label, value) of what the environment has, CUDA's absence said as such."""
    rows = []
    for key, label in ENV_FIELDS:
        value = shown(env.get(key))
        if key == "cuda" and value is None and "torch" in env:
            value = "none (a CPU build of torch)"
        if value is not None:
            rows.append((label, value))
    return rows


def run_line(env: dict) -> str:
    """' · exit status 1 · 20.3 s · 2026-12-04T12:00:00': how the run ended, when, how long."""
    parts = []
    if env.get("exit_status") is not None:
        parts.append(f"exit status {env['exit_status']}")
    if env.get("duration_s") is not None:
        parts.append(f"{float(env['duration_s']):.1f} s")
    if env.get("started"):
        parts.append(str(env["started"]))
    return "".join(f" · {part}" for part in parts)


# -- benchmarks -----------------------------------------------------------------------------------
@dataclass
class BenchTable:
    title: str
    backends: list[str]
    rows: list[tuple[str, dict[str, Optional[float]]]]  # (row label, backend -> ms per call)


@dataclass
class Spread:
    backend: str
    label: str
    metric: str
    rounds: int
    median_ms: float
    iqr_ms: float
    min_ms: float
    max_ms: float

    @property
    def iqr_pct(self) -> float:
        return 100.0 * self.iqr_ms / self.median_ms if self.median_ms else 0.0


@dataclass
class BenchView:
    machine: str
    tables: dict[str, list[BenchTable]]  # regime -> tables (one per layer shape)
    crossovers: dict[str, list[tuple[str, list[str]]]]  # regime -> (series, lines)
    panels: list[tuple[str, dict[str, dict[int, float]]]]  # compare.draw_panels's input
    spread: list[Spread]


def compare_run(run: dict):
    """The run's benchmark rows as a :class:`pytest_attn.bench.compare.Run`, read by compare's own loader."""
    import tempfile

    from pytest_attn.bench.compare import load_run as load_benchmark_run

    env = run.get("environment") or {}
    attn = {k: env.get(k) for k in ("gpu", "gpu_capability", "torch", "cuda", "flashinfer", "device")}
    document = {"machine_info": {"attn": attn, "cpu": {"brand_raw": env.get("cpu")}},
                "commit_info": {"id": env.get("commit") or "nocommit"}, "datetime": env.get("started") or "",
                "benchmarks": run.get("benchmarks") or []}
    with tempfile.TemporaryDirectory(prefix="attn-report-") as folder:
        path = Path(folder) / "benchmarks.json"
        path.write_text(json.dumps(document, default=str), encoding="utf-8")
        return load_benchmark_run(path)


def bench_view(run: dict) -> Optional[BenchView]:
    """The seed table and every other sweep in both regimes, their crossovers, the plot's panels and
    each row's spread; None when the run has no benchmark rows."""
    if not run.get("benchmarks"):
        return None
    from pytest_attn.bench.compare import REGIME_TITLES, REGIMES, pair_lines, sweeps

    bench = compare_run(run)
    if bench is None:
        return None
    tables, crossovers, panels = {}, {}, []
    for regime in REGIMES:
        tables[regime] = _bench_tables(bench.rows, regime)
        crossovers[regime] = [(series, pair_lines(per_backend))
                              for series, per_backend in sorted(sweeps(bench, regime).items())]
        panels += [(f"{series} [{regime}: {REGIME_TITLES[regime]}]\n{bench.machine}", per_backend)
                   for series, per_backend in sorted(sweeps(bench, regime).items())]
    return BenchView(bench.machine, tables, crossovers, panels, _spread(run["benchmarks"]))


def _shape(series: str) -> tuple[str, str]:
    """('seed', 'h16/16xd80 bfloat16 full') from a row's series."""
    name, _, shape = series.partition(" ")
    return name, shape


def _bench_tables(rows, regime: str) -> list[BenchTable]:
    """Per layer shape: the sweeps' sequence lengths, then the rows that are not one sequence (a
    ragged mix), each backend's median ms per call in ``regime``."""
    by_shape: dict[str, dict[tuple, dict[str, float]]] = {}
    for row in rows:
        seconds = row.regime_s(regime)
        if seconds is None:
            continue
        name, shape = _shape(row.series)
        key = (0, row.seq_len, "") if row.seq_len is not None else (1, row.tokens, name)
        by_shape.setdefault(shape, {}).setdefault(key, {})[row.backend] = seconds * 1e3
    tables = []
    for shape, found in by_shape.items():
        backends = sorted({b for per in found.values() for b in per})
        labelled = [(str(seq) if kind == 0 else f"{name} ({seq} tokens, ragged)", found[(kind, seq, name)])
                    for kind, seq, name in sorted(found)]
        tables.append(BenchTable(shape, backends, [(label, {b: per.get(b) for b in backends})
                                                   for label, per in labelled]))
    return tables


def _spread(rows: list[dict]) -> list[Spread]:
    spread = []
    for row in rows:
        info, stats = row.get("extra_info") or {}, row.get("stats") or {}
        if "median" not in stats:
            continue
        spread.append(Spread(info.get("backend", "?"), info.get("label") or row.get("name", ""),
                             info.get("metric", "device"), int(stats.get("rounds") or 0), stats["median"] * 1e3,
                             float(stats.get("iqr") or 0.0) * 1e3, float(stats.get("min") or 0.0) * 1e3,
                             float(stats.get("max") or 0.0) * 1e3))
    spread.sort(key=lambda s: (s.backend, s.metric, s.label))
    return spread


# -- two runs side by side ------------------------------------------------------------------------
@dataclass
class DiffCell:
    a: Optional[Cell]
    b: Optional[Cell]

    @property
    def changed(self) -> bool:
        return _signature(self.a) != _signature(self.b)


def _signature(cell: Optional[Cell]):
    if cell is None or not cell.total:
        return None
    return cell.passed, cell.failed, tuple(sorted((k, n) for k, n in cell.skipped.items() if n))


@dataclass
class TestChange:
    test: str
    a: Optional[str]  # outcome (with the skip's kind), None when the test was not in the run
    b: Optional[str]
    detail: str


@dataclass
class DiffView:
    labels: tuple[str, str]
    a: RunView
    b: RunView
    backends: list[str]
    rows: list[tuple[str, dict[str, DiffCell]]]
    env: list[tuple[str, Optional[str], Optional[str]]]  # (label, A's, B's)
    changes: list[TestChange]

    @property
    def changed_cells(self) -> int:
        return sum(cell.changed for _, cells in self.rows for cell in cells.values())

    @property
    def env_changed(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        return [row for row in self.env if row[1] != row[2]]

    @property
    def env_same(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        return [row for row in self.env if row[1] == row[2]]


def run_label(run: dict, fallback: str) -> str:
    """What tells a run apart: its GPU (or device), commit and torch."""
    env = run.get("environment") or {}
    parts = [env.get("gpu") or env.get("device"), env.get("commit"), env.get("torch") and f"torch {env['torch']}"]
    return " · ".join(p for p in parts if p) or fallback


def _test_key(nodeid: str) -> str:
    """A test's ID without its folder: the same test of two checkouts or installs has one key."""
    path, _, rest = nodeid.partition("::")
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}::{rest}" if rest else nodeid


def _state(test: Optional[dict]) -> Optional[str]:
    if test is None:
        return None
    return f"skipped ({test.get('kind') or 'other'})" if test["outcome"] == "skipped" else test["outcome"]


def compare_runs(a: dict, b: dict, labels: tuple[str, str]) -> DiffView:
    """Two runs' matrices cell by cell, their environments and every test whose outcome changed."""
    va, vb = build(a), build(b)
    backends = va.backends + [x for x in vb.backends if x not in va.backends]
    row_labels = [r.label for r in va.rows] + [r.label for r in vb.rows if r.label not in {x.label for x in va.rows}]
    ra, rb = {r.label: r.cells for r in va.rows}, {r.label: r.cells for r in vb.rows}
    rows = [(label, {x: DiffCell(ra.get(label, {}).get(x), rb.get(label, {}).get(x)) for x in backends})
            for label in row_labels]
    env = [(label, shown(va.env.get(key)), shown(vb.env.get(key))) for key, label in ENV_FIELDS
           if shown(va.env.get(key)) is not None or shown(vb.env.get(key)) is not None]
    return DiffView(labels, va, vb, backends, rows, env, _changes(a, b))


def _changes(a: dict, b: dict) -> list[TestChange]:
    ta = {_test_key(t["nodeid"]): t for t in a.get("tests") or [] if t.get("outcome")}
    tb = {_test_key(t["nodeid"]): t for t in b.get("tests") or [] if t.get("outcome")}
    changes = []
    for key in sorted(set(ta) | set(tb)):
        sa, sb = _state(ta.get(key)), _state(tb.get(key))
        if sa != sb:
            now = tb.get(key) or ta.get(key)
            detail = ((now.get("failure") or {}).get("summary") if now["outcome"] == "failed" else now.get("reason"))
            changes.append(TestChange(key, sa, sb, detail or ""))
    return changes
