"""``--attn-report=PATH``: what a run found, kept as a report of that run.

The :class:`RunReport` plugin (registered by ``configure`` when the option is given) collects each
attention test's outcome from its reports, as the closing section does: from the user properties a
report carries (``attn_backend``, ``attn_case``, ``attn_failure``), so that under xdist the
workers' reports and under --attn-isolate the children's, which the controller or the parent
receives through ``pytest_runtest_logreport``, are merged into one run. At the end it writes the
run's data (:func:`run_data`, the ``.json`` format) and renders it as each PATH's suffix asks
(:mod:`pytest_attn.report.render`).

A skipped test's reasons are classified (:func:`classify_reasons`, :func:`classify_reason`) into
one of :data:`pytest_attn.report.model.SKIP_KINDS`, so that a hazard (a case the backend refuses
because running it is known to give a wrong result or crash) is shown apart from a case it simply
does not support.

Data that issue 20's checks may add later travel the same way: a test that records
``record_property("attn_kernels", [names])`` or
``record_property("attn_determinism", {"property": ..., "holds": bool, "detail": ...})`` gets the
``kernels`` / ``determinism`` sections of the report; runs without them have neither key.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pytest

from pytest_attn.plugin.collected import (BACKEND_PROPERTY, CASE_PROPERTY, FAILURE_PROPERTY, RERUN_PROPERTY, TEST_PROPERTY,
                    UNSUPPORTED_PROPERTY)
from pytest_attn.report.model import NO_BACKEND, REPORT_FORMAT, REPORT_SUFFIXES, REPORT_VERSION

KERNELS_PROPERTY = "attn_kernels"  # user_properties entry: the kernels a test's backend ran (issue 20)
NO_KERNEL_SUMMARY = "no attention kernel recorded"  # check.traces.KernelTrace.summary() when there is none
DETERMINISM_PROPERTY = "attn_determinism"  # user_properties entry: one determinism property checked (issue 20)
FAILURE_TEXT_LIMIT = 6000  # characters of a failure's text kept in the report

# -- skip reasons ---------------------------------------------------------------------------------
#: Words by which a backend's reason says that running the case is known to give a wrong result or
#: to crash (the hazards of backends/flashinfer.py and backends/trtllm.py say so in these words).
HAZARD_WORDS = ("wrong", "crash", "illegal memory access", "garbage", "silently", "exit(1)", "relative error",
                "relative l2 error", "poisons", "launch nothing")
UPSTREAM_ISSUE = re.compile(r"#\d{3,}")  # "FlashInfer #4299", "TensorRT-LLM #10102"
JIT_BUDGET = "JIT budget"
UNAVAILABLE_MARKS = ("is unavailable here", "needs a CUDA device", "no attention backend is available")


def classify_reasons(reasons) -> str:
    """The kind of a skip given as the backend's reasons one by one (the attn_unsupported property)."""
    kinds = {_part_kind(str(reason)) for reason in reasons} or {"unsupported"}
    return next(kind for kind in ("hazard", "unsupported", "jit-budget") if kind in kinds)


def classify_reason(reason: str, from_backend: bool = True) -> str:
    """The kind of a skip reason (one of report_model.SKIP_KINDS) from its text, by this rule:

    - ``unavailable``: the backend or the device is not there (nothing was asked of the backend);
    - ``other``: a skip that is not a backend's answer (``from_backend`` False), e.g. a missing plugin;
    - a backend's reasons (split_reasons) are each a hazard when they name an upstream issue
      (``#NNNN``) or a wrong result or crash (HAZARD_WORDS), a JIT-budget reason when they say
      "JIT budget" (a kernel this run did not build), else unsupported; the skip is a hazard if any
      reason is, else unsupported if any reason is, else jit-budget.
    """
    if any(mark in reason for mark in UNAVAILABLE_MARKS):
        return "unavailable"
    if not from_backend:
        return "other"
    return classify_reasons(split_reasons(reason))


def split_reasons(text: str) -> list[str]:
    """A skip's reasons from its text: UnsupportedCase joins them with "; ", which a reason may also
    hold, inside its parentheses ("(each family takes ~100 s; measured on an H100)") or before its
    advice ("...not built in this run; set X=all"): split outside parentheses, and keep a part
    that starts with "set " (advice) with the reason before it."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth <= 0 and text.startswith("; ", i):
            parts.append(text[start:i])
            start = i + 2
    parts.append(text[start:])
    joined: list[str] = []
    for part in (p.strip() for p in parts if p.strip()):
        if joined and part.startswith("set "):
            joined[-1] += "; " + part
        else:
            joined.append(part)
    return joined


def _part_kind(part: str) -> str:
    if JIT_BUDGET in part:
        return "jit-budget"
    lowered = part.lower()
    if UPSTREAM_ISSUE.search(part) or any(word in lowered for word in HAZARD_WORDS):
        return "hazard"
    return "unsupported"


def skip_reason(report, backend: Optional[str]) -> tuple[str, bool]:
    """(reason, from_backend): a skipped report's reason without pytest's and the backend's
    prefixes, and whether it is the backend's own answer (an UnsupportedCase: "NAME: reasons")."""
    longrepr = report.longrepr
    # (path, line, message); a list when it came back through JSON (an --attn-isolate child's report)
    reason = longrepr[2] if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ").strip()
    if backend and reason.startswith(f"{backend}: "):
        return reason.removeprefix(f"{backend}: "), True
    if backend:
        reason = reason.removeprefix(f"backend {backend!r} ")
    return reason, False


# -- one test's record ----------------------------------------------------------------------------
@dataclass
class Record:
    nodeid: str
    test: str  # the test function's name
    backend: Optional[str]  # None: an attention test that runs no one backend (e.g. the differential)
    case: Optional[str]
    tags: list[str]
    outcome: str = ""  # passed, failed or skipped ("" until a report says)
    reason: Optional[str] = None  # skipped: why, without the backend's name
    kind: Optional[str] = None  # skipped: one of report_model.SKIP_KINDS
    failure: Optional[dict] = None  # failed: see failure_of()
    duration_s: float = 0.0
    rerun: str = ""


def kernel_counts(value) -> list[tuple[str, int]]:
    """(kernel, launches) from an attn_kernels property: a list of names, or one traced step
    (test_kernels: {"step", "plan", "kernels": "name xN; name xN"}, the trace's summary)."""
    if isinstance(value, dict):
        summary = str(value.get("kernels") or "")
        if not summary or summary == NO_KERNEL_SUMMARY:
            return []
        found = []
        for part in summary.split("; "):
            kernel, _, count = part.rpartition(" x")
            found.append((kernel, int(count)) if kernel and count.isdigit() else (part, 1))
        return found
    if isinstance(value, (list, tuple)):
        return [(str(kernel), 1) for kernel in value]
    return [(str(value), 1)] if value else []


def _property(report, name: str):
    for key, value in getattr(report, "user_properties", ()):
        if key == name:
            return value
    return None


def _test_name(nodeid: str) -> str:
    return nodeid.split("::")[-1].split("[")[0]


_SUMMARY = re.compile(r"^(?P<case>[^:]+): step (?P<step>\d+)(?:, layer (?P<layer>\d+))?: (?P<what>.*)$", re.S)
_STEP_LINE = re.compile(r"^- step (?P<step>\d+)(?:, layer (?P<layer>\d+))?: (?P<batch>.*)$", re.M)
_PLAN_LINE = re.compile(r"^\s+plan: (?P<plan>.*)$", re.M)


def failure_of(report, case) -> dict:
    """What a report says failed: its one line, the phase, and for a failed comparison the step and
    layer that failed first, the batch of that step, its plan and the layer's parameters."""
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    text = re.sub(r"^E   ", "", text, flags=re.M)  # pytest's marks of the exception's lines
    summary = _property(report, FAILURE_PROPERTY) or _last_error_line(text) or report.outcome
    failure = {"summary": summary, "when": report.when, "step": None, "layer": None, "batch": None, "plan": None,
               "layer_spec": None, "text": text[:FAILURE_TEXT_LIMIT]}
    match = _SUMMARY.match(summary)
    if match:
        failure["step"] = int(match["step"])
        failure["layer"] = int(match["layer"]) if match["layer"] else None
    for line in _STEP_LINE.finditer(text):
        if failure["step"] is None or int(line["step"]) == failure["step"]:
            failure["step"] = int(line["step"])
            failure["layer"] = int(line["layer"]) if line["layer"] else failure["layer"]
            failure["batch"] = line["batch"].strip()
            plan = _PLAN_LINE.search(text, line.end())
            failure["plan"] = plan["plan"].strip() if plan else None
            break
    if case is not None:
        failure["layer_spec"] = case.layer(failure["layer"] or 0).describe() + (
            "" if case.num_layers == 1 else f" (layer {failure['layer'] or 0} of {case.num_layers})")
    return failure


def _last_error_line(text: str) -> Optional[str]:
    for line in text.strip().splitlines():
        if line.strip().startswith("E "):
            return line.strip()[2:].strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def catalog_case(name: Optional[str], nodeid: str):
    """The catalog case a test ran, in the dtype its ID names (--attn-dtype); None if not a catalog case."""
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.core.layer import DTYPES

    case = CATALOG.get(name) if name else None
    if case is None:
        return None
    for dtype in DTYPES:
        if f"{name}-{dtype}]" in nodeid or f"{name}-{dtype}-" in nodeid:
            return case.with_dtype(dtype)
    return case


# -- the environment ------------------------------------------------------------------------------
def environment(config, session) -> dict:
    """GPU, driver, CUDA, cuDNN, torch and the kernel libraries' versions (as benchmarks record
    them), Python, the seed and options, the command line and the commit."""
    import platform
    import shlex

    from pytest_attn.bench.machine import attn_machine_info
    from pytest_attn.env.packages import dist_version

    try:
        device = session.device
        env = attn_machine_info(device)
    except Exception as exc:  # no usable torch: say so in the report rather than lose it
        device, env = None, {"error": f"could not read the device and library versions: {exc}"}
    addopts = os.environ.get("PYTEST_ADDOPTS", "").strip()
    command = shlex.join(["pytest", *map(str, config.invocation_params.args)])
    env.update({
        "device": device,
        "cudnn_frontend": dist_version("nvidia-cudnn-frontend"),
        "tensorrt_llm": dist_version("tensorrt-llm", "tensorrt_llm"),
        "cpu": cpu_name(), "python": platform.python_version(), "platform": platform.platform(),
        "pytest": pytest.__version__, "pytest_attn": dist_version("pytest-attn"),
        "seed": session.seed, "strict": session.strict, "dtypes": list(session.dtypes),
        "max_tokens": session.max_tokens, "case_filter": list(session.case_filter),
        "backends": [b.name for b in session.selected], "unavailable": dict(session.unavailable),
        "command": (f"PYTEST_ADDOPTS={shlex.quote(addopts)} " if addopts else "") + command,
        "workers": _workers(config), "isolate": [v for v in config.getoption("attn_isolate", None) or []],
        "commit": git_commit(config.rootpath),
    })
    return env


def cpu_name() -> str:
    """The processor's model name (what benchmarks on CPU are comparable by)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _workers(config) -> Optional[int]:
    numprocesses = getattr(config.option, "numprocesses", None)
    return numprocesses if isinstance(numprocesses, int) and numprocesses > 0 else None


def git_commit(root: Path) -> Optional[str]:
    """The checked-out commit of the run's root directory (+dirty), or None outside git."""
    import shutil
    import subprocess

    if not shutil.which("git"):
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def dimension_order() -> list[str]:
    """The catalog's tags in the order the catalog first uses them: the matrix's rows."""
    from pytest_attn.cases.catalog import CATALOG

    return list(dict.fromkeys(tag for case in CATALOG.values() for tag in case.tags))


# -- the plugin -----------------------------------------------------------------------------------
def report_paths(config) -> list[Path]:
    """The --attn-report paths, each with a suffix that names its format; a usage error otherwise."""
    paths = []
    for value in config.getoption("attn_report", None) or []:
        path = Path(str(value)).expanduser()
        if path.suffix.lower() not in REPORT_SUFFIXES:
            raise pytest.UsageError(f"pytest-attn: --attn-report={value}: the suffix picks the format; give a path "
                                    f"ending in {', '.join(sorted(set(REPORT_SUFFIXES)))}")
        paths.append(path if path.is_absolute() else Path(config.invocation_params.dir) / path)
    return paths


def configure(config) -> None:
    """Register the collector when --attn-report is given, or pytest-html writes a report (which
    then shows the matrix), in the process that sees every report: not in an xdist worker (the
    controller gets its reports) nor in an --attn-isolate child (the parent gets its reports)."""
    from pytest_attn.plugin.isolation import CHILD_ENV

    paths = report_paths(config)
    if not (paths or _pytest_html_report(config)) or hasattr(config, "workerinput") or os.environ.get(CHILD_ENV):
        return
    if not config.pluginmanager.has_plugin(RunReport.name):
        config.pluginmanager.register(RunReport(config, paths), RunReport.name)


def _pytest_html_report(config) -> bool:
    return config.pluginmanager.hasplugin("html") and bool(config.getoption("htmlpath", None))


class RunReport:
    """Collects every attention test's outcome (and benchmark rows) and writes the report at the end."""

    name = "attn-run-report"

    def __init__(self, config, paths: list[Path]):
        self.config, self.paths = config, paths
        self.tests: dict[str, Record] = {}
        self.benchmarks: list[dict] = []
        self.kernels: dict[str, dict[str, int]] = {}  # backend -> kernel name -> tests
        self.determinism: dict[str, dict[str, dict]] = {}  # backend -> property -> {"holds", "fails", "details"}
        self.started = time.time()
        self.written: list[Path] = []
        self.error: Optional[str] = None
        self._environment: Optional[dict] = None

    def environment(self) -> dict:
        """Read once (it imports torch and asks git), when the report is first rendered."""
        if self._environment is None:
            from pytest_attn.plugin.session import attn_session_of

            self._environment = environment(self.config, attn_session_of(self.config))
        return self._environment

    # -- collecting ----------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        backend = _property(report, BACKEND_PROPERTY)
        if backend is None and not _property(report, TEST_PROPERTY):
            return
        record = self.tests.get(report.nodeid)
        if record is None:
            case_name = _property(report, CASE_PROPERTY)
            case = catalog_case(case_name, report.nodeid)
            record = self.tests[report.nodeid] = Record(report.nodeid, _test_name(report.nodeid), backend,
                                                            case_name, list(case.tags) if case else [])
        record.duration_s += float(getattr(report, "duration", 0.0) or 0.0)
        self._extra_data(report, backend)
        if report.failed:
            if record.outcome != "failed":
                record.outcome, record.reason, record.kind = "failed", None, None
                record.failure = failure_of(report, catalog_case(record.case, report.nodeid))
                record.rerun = _property(report, RERUN_PROPERTY) or ""
        elif report.skipped and getattr(report, "wasxfail", None) is not None:
            if not record.outcome:  # a known failure (strict xfail): said apart from a skip
                record.outcome, record.reason, record.kind = "skipped", str(report.wasxfail), "known-failure"
        elif report.skipped:
            if not record.outcome:
                reason, from_backend = skip_reason(report, backend)
                reasons = _property(report, UNSUPPORTED_PROPERTY)
                kind = classify_reasons(reasons) if reasons else classify_reason(reason, from_backend)
                record.outcome, record.reason, record.kind = "skipped", reason, kind
        elif report.when == "call" and not record.outcome:
            record.outcome = "passed"

    def _extra_data(self, report, backend: Optional[str]) -> None:
        if report.when != "call":
            return
        name = backend or NO_BACKEND
        for key, value in getattr(report, "user_properties", ()):
            if key == KERNELS_PROPERTY:
                for kernel, count in kernel_counts(value):  # none recorded: no entry for the backend
                    counts = self.kernels.setdefault(name, {})
                    counts[kernel] = counts.get(kernel, 0) + count
            elif key == DETERMINISM_PROPERTY:
                self._determinism(name, value)

    def _determinism(self, name: str, found) -> None:
        if isinstance(found, dict) and "property" in found:
            entry = self.determinism.setdefault(name, {}).setdefault(
                str(found["property"]), {"holds": 0, "fails": 0, "details": []})
            entry["holds" if found.get("holds") else "fails"] += 1
            if found.get("detail") and found["detail"] not in entry["details"]:
                entry["details"].append(str(found["detail"]))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """A benchmark's row, as pytest-benchmark saves it (its statistics and extra_info), taken
        where it ran: benchmarks run serially, in this process (pytest-benchmark is off under xdist)."""
        report = yield
        if call.when == "call" and report.passed:
            row = benchmark_row(item)
            if row is not None:
                self.benchmarks.append(row)
        return report

    # -- writing -------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_sessionfinish(self, session, exitstatus):
        result = yield  # after every other sessionfinish: the exit status is final (the run verdict's too)
        if _ran_tests(self.config):
            try:
                self.written = write(run_data(self, int(session.exitstatus)), self.paths)
            except Exception as exc:  # a report that cannot be written must not hide the run's own result
                self.error = f"{type(exc).__name__}: {exc}"
        return result

    @pytest.hookimpl(trylast=True)  # after the closing section
    def pytest_terminal_summary(self, terminalreporter):
        for path in self.written:
            terminalreporter.write_line(f"pytest-attn report: {path}")
        if self.error:
            terminalreporter.write_line(f"pytest-attn report: NOT written: {self.error}", red=True, bold=True)

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(self, prefix, summary, postfix, session):
        """pytest-html: the support matrix at the top of its report's summary."""
        from pytest_attn.report.render import matrix_fragment

        prefix.append(matrix_fragment(run_data(self, int(session.exitstatus))))


def _ran_tests(config) -> bool:
    option = config.option
    return not any(getattr(option, flag, False) for flag in ("collectonly", "setuponly", "setupplan"))


def benchmark_row(item) -> Optional[dict]:
    """The pytest-benchmark row an attention benchmark recorded, in its saved JSON's form (without
    its parameters, which hold backend objects, nor its raw samples), or None."""
    attn_benchmark = (getattr(item, "funcargs", None) or {}).get("attn_benchmark")
    fixture = getattr(attn_benchmark, "benchmark", None)  # pytest-benchmark's fixture, which it wraps
    if getattr(fixture, "stats", None) is None:
        return None
    row = fixture.stats.as_dict(include_data=False)
    row.pop("params", None)
    return row


def run_data(plugin: RunReport, exit_status: int) -> dict:
    """The run as the report's .json holds it (report_render renders it; ``pytest-attn report``
    reads it back)."""
    from pytest_attn.plugin.run_verdict import RunVerdict

    verdict = plugin.config.pluginmanager.get_plugin(RunVerdict.name)
    env = dict(plugin.environment())
    env.update({"started": _iso(plugin.started), "duration_s": round(time.time() - plugin.started, 3),
                "exit_status": exit_status, "problems": list(getattr(verdict, "problems", None) or [])})
    data = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "environment": env,
            "dimensions": dimension_order(), "tests": [asdict(t) for t in plugin.tests.values()]}
    if plugin.benchmarks:
        data["benchmarks"] = plugin.benchmarks
    if plugin.kernels:
        data["kernels"] = plugin.kernels
    if plugin.determinism:
        data["determinism"] = plugin.determinism
    return data


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))


def write(data: dict, paths: list[Path]) -> list[Path]:
    """Render ``data`` into each path in the format its suffix names; the paths written."""
    from pytest_attn.report.render import render_run

    written = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        render_run(data, path)
        written.append(path)
    return written
