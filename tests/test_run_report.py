"""--attn-report and `pytest-attn report`, checked as a user reads them: a run with planted failures
and skips (small backends installed through an entry point: one that fails, one that supports only
head_dim 64, one that refuses a case as a known hazard and another for a JIT budget, one that is
unavailable) writes its report as .json, .md and .html; each is parsed back, and its cells, counts
and reasons must equal the run's own outcomes, read from pytest's reports (in-process), or from
junit XML (xdist, --attn-isolate). The matrix's symbols are the documented legend."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest
from backend_packages import write_backend_package

from pytest_attn.cases.catalog import CATALOG
from pytest_attn.plugin.run_report import classify_reason, classify_reasons

PLANTED = '''
import os

from pytest_attn.core.contract import Availability, Capabilities
from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class Narrow(TorchSDPABackend):
    capabilities = Capabilities(head_dims=frozenset({64}), sliding_window=True)


class Forgets(TorchSDPABackend):
    """Forgets to write its last request's rows, unless PLANTED_FIXED=1 (a fixed release)."""

    def forward(self, q, k, v, metadata, plan, out=None):
        full = super().forward(q, k, v, metadata, plan)
        if os.environ.get("PLANTED_FIXED") == "1":
            out.copy_(full)
            return out
        last = metadata.qo_indptr[-2]
        out[:last] = full[:last]
        return out


class Risky(TorchSDPABackend):
    def unsupported(self, layer, metadata, device="cpu"):
        reasons = super().unsupported(layer, metadata, device)
        if layer.window_left >= 0:
            reasons.append("its sliding window gives wrong results on the first tile (upstream #1234)")
        if layer.head_dim == 80:
            # "; " inside a reason: only the reasons one by one (attn_unsupported) tell it from two reasons
            reasons.append("JIT budget: head_dim 80 kernels are not built in this run; build them with RISKY_JIT=all")
        return reasons


class Ghost(TorchSDPABackend):
    def available(self):
        return Availability(False, "needs the ghost library (pip install ghost-attn)")


good, narrow, forgets = TorchSDPABackend(name="good"), Narrow(name="narrow"), Forgets(name="forgets")
risky, ghost = Risky(name="risky"), Ghost(name="ghost")
'''
PLANTED_ENTRY_POINTS = {name: f"planted_attn:{name}" for name in ("good", "narrow", "forgets", "risky", "ghost")}
BACKENDS = "--attn-backend=good,narrow,forgets,risky,ghost"
CASES = "--attn-cases=hd64-ragged,hd80-ragged,swa-full-ragged,softcap-30-low-logits"
TESTS = """
from pytest_attn.check.harness import assert_case_passes, run_case

def test_case(attn_backend, attn_case, attn_device, attn_seed):
    assert_case_passes(run_case(attn_backend, attn_case, device=attn_device, seed=attn_seed), attn_backend, attn_case)

def test_small_batch(attn_backend, make_attn_batch):
    make_attn_batch([5, 3], num_heads=2, head_dim=16).assert_matches_reference(attn_backend)

def test_session_only(attn_session):
    assert attn_session.seed >= 0
"""
#: What the test knows of the skips it planted: a substring of each skip message, and its kind.
PLANTED_SKIPS = {"#1234": "hazard", "JIT budget": "jit-budget", "unavailable here": "unavailable",
                 "not supported": "unsupported"}
#: The legend's symbols (the report's documented format).
SYMBOLS = {"✗": "failed", "⚠": "hazard", "⊘": "unsupported", "◷": "jit-budget", "∅": "unavailable",
           "◌": "other"}
ALL_ROW, NO_CASE_ROW, OTHER_COLUMN = "all tests", "tests without a catalog case", "(other tests)"


@pytest.fixture
def planted(pytester, monkeypatch):
    site = write_backend_package(pytester, "planted_attn", PLANTED, PLANTED_ENTRY_POINTS)
    monkeypatch.setenv("PYTHONPATH", str(site))  # for subprocess runs, xdist workers and isolated children
    pytester.makepyfile(test_planted=TESTS)
    return site


# -- the run's own outcomes: the oracle ------------------------------------------------------------
def planted_kind(message: str) -> str:
    return next(kind for mark, kind in PLANTED_SKIPS.items() if mark in message)


def outcomes_from_reports(reports) -> dict[str, dict]:
    """nodeid -> {backend, case, outcome, message}, as pytest's own reports say."""
    found: dict[str, dict] = {}
    for report in reports:
        props = dict(report.user_properties)
        if "attn_backend" not in props and "attn_test" not in props:
            continue
        entry = found.setdefault(report.nodeid, {"backend": props.get("attn_backend", OTHER_COLUMN),
                                                 "case": props.get("attn_case"), "outcome": None, "message": ""})
        if report.failed:
            entry["outcome"] = "failed"
        elif report.skipped and entry["outcome"] is None:
            entry["outcome"], entry["message"] = "skipped", report.longrepr[2]
        elif report.when == "call" and entry["outcome"] is None:
            entry["outcome"] = "passed"
    return found


#: A conftest that records, in the parent process, every report pytest logs (isolated children's too).
RECORDER = """
import json, os

def pytest_runtest_logreport(report):
    if os.environ.get("PYTEST_ATTN_ISOLATED_CHILD"):
        return
    longrepr = report.longrepr
    message = list(longrepr)[2] if report.skipped and isinstance(longrepr, (tuple, list)) else ""
    with open(os.path.join(os.path.dirname(__file__), "logged.jsonl"), "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "props": [list(p) for p in report.user_properties], "message": message}) + "\\n")
"""


class Logged:
    """A report as the recorder wrote it down."""

    def __init__(self, data):
        self.nodeid, self.when, self.message = data["nodeid"], data["when"], data["message"]
        self.user_properties = [tuple(p) for p in data["props"]]
        self.failed, self.skipped = data["outcome"] == "failed", data["outcome"] == "skipped"
        self.longrepr = (None, None, data["message"])


def outcomes_from_recorder(path: Path) -> dict[str, dict]:
    return outcomes_from_reports([Logged(json.loads(line)) for line in path.read_text().splitlines()])


def outcomes_from_junit(path: Path) -> dict[str, dict]:
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if "attn_backend" not in props and "attn_test" not in props:
            continue
        nodeid = f"{case.get('classname').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome, message = "failed", ""
        elif case.find("skipped") is not None:
            outcome, message = "skipped", case.find("skipped").get("message")
        else:
            outcome, message = "passed", ""
        found[nodeid] = {"backend": props.get("attn_backend", OTHER_COLUMN), "case": props.get("attn_case"),
                         "outcome": outcome, "message": message}
    return found


def expected_cells(outcomes: dict[str, dict]) -> dict[tuple[str, str], Counter]:
    """(row, backend) -> Counter(passed, ran, failed and each skip kind)."""
    cells: dict = defaultdict(Counter)
    for entry in outcomes.values():
        rows = [ALL_ROW] + (list(CATALOG[entry["case"]].tags) if entry["case"] else [NO_CASE_ROW])
        for row in rows:
            cell = cells[(row, entry["backend"])]
            if entry["outcome"] == "skipped":
                cell[planted_kind(entry["message"])] += 1
            else:
                cell[entry["outcome"]] += 1
                cell["ran"] += 1
    return dict(cells)


def expected_reasons(outcomes: dict[str, dict]) -> dict[str, Counter]:
    """backend -> skip message -> tests."""
    reasons: dict = defaultdict(Counter)
    for entry in outcomes.values():
        if entry["outcome"] == "skipped":
            reasons[entry["backend"]][entry["message"]] += 1
    return dict(reasons)


# -- reading the report back -----------------------------------------------------------------------
def parse_cell(text: str) -> Counter:
    """'5/6 ✗1 ⚠2 [F1,3]' -> Counter(passed=5, ran=6, failed=1, hazard=2)."""
    text = re.sub(r"\[[^\]]*\]", "", text).replace("*", "").strip()
    if text in ("–", ""):
        return Counter()
    match = re.match(r"(\d+)/(\d+)((?:\s*\S\d+)*)", text)
    assert match, f"not a cell: {text!r}"
    cell = Counter(passed=int(match[1]), ran=int(match[2]))
    for symbol, n in re.findall(r"(\S)(\d+)", match[3]):
        cell[SYMBOLS[symbol]] += int(n)
    cell["failed"] = cell["failed"]
    return +cell if cell["ran"] or any(cell[k] for k in SYMBOLS.values()) else Counter()


class TableReader(HTMLParser):
    """Every <table>'s rows as lists of (text, attributes) cells; the table's class and its rows' ids.
    A cell's text leaves out its links to footnotes (<span class="refs">), as a reader's eye does."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._cell = None
        self._in_refs = False
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "refs":
            self._in_refs = True
        elif tag == "table":
            self.tables.append({"class": attrs.get("class", ""), "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"id": attrs.get("id"), "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = ["", attrs]
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_refs = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1]["cells"].append((" ".join(self._cell[0].split()), self._cell[1]))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None and not self._in_refs:
            self._cell[0] += data


def html_tables(text: str) -> TableReader:
    reader = TableReader()
    reader.feed(text)
    return reader


def matrix_from_html(text: str) -> dict[tuple[str, str], Counter]:
    table = next(t for t in html_tables(text).tables if t["class"] == "matrix")
    header = [c for c, _ in table["rows"][0]["cells"][1:]]
    cells = {}
    for row in table["rows"][1:]:
        label = re.sub(r"\s+\d+$", "", row["cells"][0][0])
        for backend, (text_, _) in zip(header, row["cells"][1:]):
            if parse_cell(text_):
                cells[(label, backend)] = parse_cell(text_)
    return cells


def reasons_from_html(text: str) -> dict[str, list[tuple[str, int, str]]]:
    """backend -> [(kind, count, reason)] from the reasons section (one table per backend, after its h3)."""
    found = defaultdict(list)
    backends = re.findall(r'<h3 id="reasons-[^"]*">([^:<]+):', text)
    tables = [t for t in html_tables(text).tables if t["class"] == "reasons"]
    for backend, table in zip(backends, tables):
        for row in table["rows"]:
            number, kind, count, reason = (c for c, _ in row["cells"])
            found[backend].append((kind.split()[-1], int(count.rstrip("×")), reason))
    return dict(found)


def matrix_from_md(text: str) -> dict[tuple[str, str], Counter]:
    lines = text.split("### Support matrix", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:  # the table: the lines that start with "|", up to the first that does not
        if not line.startswith("|"):
            break
        rows.append(line)
    header = [c.strip() for c in rows[0].strip("|").split("|")][1:]
    cells = {}
    for line in rows[2:]:
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        label = re.sub(r"\s+\(\d+\)$", "", parts[0].replace("**", ""))
        for backend, text_ in zip(header, parts[1:]):
            if parse_cell(text_):
                cells[(label, backend)] = parse_cell(text_)
    return cells


def reasons_from_md(text: str) -> dict[str, list[tuple[str, int, str]]]:
    section = text.split("### Why tests were skipped", 1)[1].split("\n### ", 1)[0]
    found, backend = defaultdict(list), None
    for line in section.splitlines():
        heading = re.match(r"^\*\*(.+?)\*\* \(\d+ skipped\)$", line)
        if heading:
            backend = heading[1]
        elif re.match(r"^\| \d+ \|", line):
            number, kind, count, reason = (c.strip() for c in line.strip().strip("|").split(" | "))
            found[backend].append((kind.split()[-1], int(count), reason.replace("\\|", "|")))
    return dict(found)


def matrix_from_json(data: dict) -> dict[tuple[str, str], Counter]:
    cells = {}
    for backend, rows in data["matrix"].items():
        for row, cell in rows.items():
            counts = Counter(passed=cell["passed"], failed=cell["failed"], ran=cell["passed"] + cell["failed"],
                             **cell["skipped"])
            cells[(row, backend)] = +counts
    return cells


def reasons_from_json(data: dict) -> dict[str, list[tuple[str, int, str]]]:
    grouped = defaultdict(Counter)
    for test in data["tests"]:
        if test["outcome"] == "skipped":
            grouped[test["backend"] or OTHER_COLUMN][(test["kind"], test["reason"])] += 1
    return {b: [(kind, n, reason) for (kind, reason), n in counts.items()] for b, counts in grouped.items()}


def assert_reasons_match(found: dict, outcomes: dict[str, dict]) -> None:
    """Each backend's skip messages, grouped with counts, are the report's reasons (each reason is
    its message without the backend's prefix), with the planted kind."""
    expected = expected_reasons(outcomes)
    assert set(found) == set(expected)
    for backend, messages in expected.items():
        assert len(found[backend]) == len(messages), (backend, found[backend], messages)
        for message, count in messages.items():
            matches = [(k, n) for k, n, reason in found[backend] if reason and reason in message]
            assert matches == [(planted_kind(message), count)], (backend, message, found[backend])


def normalise(cells: dict) -> dict:
    return {key: +Counter(value) for key, value in cells.items() if +Counter(value)}


def assert_report_matches(path: Path, outcomes: dict[str, dict]) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        got = {t["nodeid"]: t["outcome"] for t in data["tests"]}
        assert got == {nodeid: e["outcome"] for nodeid, e in outcomes.items()}
        cells, reasons = matrix_from_json(data), reasons_from_json(data)
    elif path.suffix == ".md":
        cells, reasons = matrix_from_md(text), reasons_from_md(text)
    else:
        cells, reasons = matrix_from_html(text), reasons_from_html(text)
    assert normalise(cells) == normalise(expected_cells(outcomes))
    assert_reasons_match(reasons, outcomes)


# -- the rule that tells a hazard from "unsupported" -----------------------------------------------
@pytest.mark.parametrize("reason, kind", [
    ("fa2 at head_dim 80 is a known crash: ... (FlashInfer issue #4299)", "hazard"),
    ("CUDA-core decode is not trusted at head_dim 80: ... it silently returns wrong outputs", "hazard"),
    ("FMHAv2 saves softmax statistics only from CONTIGUOUS_Q_KV; SEPARATE_Q_K_V would exit(1) the process", "hazard"),
    ("JIT budget: fa3 kernels for bfloat16 head_dim 128 are not built in this run (each fa3 family takes ~100 s "
     "to build; measured on an H100); set PYTEST_ATTN_FLASHINFER_JIT=all to build it", "jit-budget"),
    ("sliding-window attention not supported", "unsupported"),
    ("fa2 has no valid tile configuration at head_dim 192 (FlashInfer raises 'Invalid configuration'; measured "
     "on an H100)", "unsupported"),
    ("logits soft-cap not supported; JIT budget: XQA (...) is not built in this run", "unsupported"),
    ("JIT budget: XQA is not built; the decode wrapper gets it wrong (#4972)", "hazard"),
    ("backend 'ghost' is unavailable here: needs the ghost library", "unavailable"),
])
def test_skip_reasons_are_classified_by_the_documented_rule(reason, kind):
    assert classify_reason(reason) == kind


def test_the_reasons_one_by_one_classify_what_the_joined_text_cannot():
    joined = "JIT budget: head_dim 80 kernels are not built in this run; build them with RISKY_JIT=all"
    assert classify_reason(joined) == "unsupported"  # two reasons, as far as the text can tell
    assert classify_reasons([joined]) == "jit-budget"  # what the backend said: one reason
    assert classify_reasons([joined, "logits soft-cap not supported"]) == "unsupported"


def test_a_skip_that_is_not_a_backend_answer_is_other():
    assert classify_reason("pytest-benchmark is not loaded", from_backend=False) == "other"
    assert classify_reason("needs a CUDA device; this run's device is cpu", from_backend=False) == "unavailable"


def test_the_built_in_backends_hazards_are_hazards_and_their_budgets_budgets():
    """The rule read against the reasons the GPU backends really give (decided without a GPU)."""
    from pytest_attn.core.layer import LayerSpec
    from pytest_attn_backends import flashinfer

    hd80 = LayerSpec(num_heads=16, num_kv_heads=16, head_dim=80, dtype="bfloat16", mask="full")
    hd128 = LayerSpec(num_heads=8, num_kv_heads=8, head_dim=128, dtype="bfloat16", mask="causal")
    [crash] = flashinfer.kernel_hazards("fa2", hd80, (9, 0))
    [budget] = flashinfer.kernel_hazards("fa3", hd128, (9, 0))
    [not_hopper] = flashinfer.kernel_hazards("fa3", hd128, (8, 0))
    assert (classify_reason(crash), classify_reason(budget), classify_reason(not_hopper)) == \
        ("hazard", "jit-budget", "unsupported")


def test_a_layer_is_described_by_its_mask_window_scale_heads_and_dtypes():
    assert CATALOG["hd80-ragged"].layer().describe() == "causal mask, scale 0.1118, 16/16 heads x 80, bfloat16"
    assert CATALOG["swa-full-ragged"].layer().describe().startswith("full mask, window_left 48, scale 0.125, ")


# -- a run's report: cells, counts and reasons equal the run's outcomes ------------------------------
def test_report_cells_counts_and_reasons_equal_the_runs_outcomes(pytester, planted):
    result = pytester.runpytest(BACKENDS, CASES, "--attn-report=out/r.json", "--attn-report=out/r.md",
                                "--attn-report=out/r.html", "-p", "no:randomly")
    outcomes = outcomes_from_reports(result.reprec.getreports("pytest_runtest_logreport"))
    counts = Counter(e["outcome"] for e in outcomes.values())
    # what was planted happened: failures, each kind of skip, passes, and every row
    assert counts["failed"] >= 3 and counts["passed"] >= 5
    assert {planted_kind(e["message"]) for e in outcomes.values() if e["outcome"] == "skipped"} == \
        {"hazard", "jit-budget", "unavailable", "unsupported"}
    for suffix in (".json", ".md", ".html"):
        assert_report_matches(pytester.path / "out" / f"r{suffix}", outcomes)
        assert f"pytest-attn report: {pytester.path / 'out' / f'r{suffix}'}" in result.stdout.str()


def test_hazards_are_marked_apart_from_unsupported_cases_in_the_html(pytester, planted):
    pytester.runpytest(BACKENDS, CASES, "--attn-report=r.html", "--attn-report=r.json", "--attn-report=r.md")
    table = next(t for t in html_tables((pytester.path / "r.html").read_text()).tables if t["class"] == "matrix")
    header = [c for c, _ in table["rows"][0]["cells"]]
    swa = next(r for r in table["rows"] if r["cells"][0][0].startswith("swa"))
    soft_cap = next(r for r in table["rows"] if r["cells"][0][0].startswith("soft-cap"))
    risky = header.index("risky")
    assert "hazard" in swa["cells"][risky][1]["class"] and "⚠1" in swa["cells"][risky][0]
    assert "skip" in soft_cap["cells"][risky][1]["class"] and "⊘1" in soft_cap["cells"][risky][0]
    assert "fail" in swa["cells"][header.index("forgets")][1]["class"]
    # and `pytest-attn report` rebuilds the very same report from the .json
    from pytest_attn.cli.main import main

    for suffix in (".html", ".md", ".json"):
        out = pytester.path / f"again{suffix}"
        assert main(["report", str(pytester.path / "r.json"), "-o", str(out)]) == 0
        assert out.read_text() == (pytester.path / f"r{suffix}").read_text()


def test_failures_name_layer_and_batch_and_their_rerun_command_fails_the_same_way(pytester, planted):
    result = pytester.runpytest(BACKENDS, CASES, "--attn-report=r.json", "-p", "no:randomly")
    failed = [r for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed]
    data = json.loads((pytester.path / "r.json").read_text())
    failures = {t["nodeid"]: t for t in data["tests"] if t["outcome"] == "failed"}
    assert set(failures) == {r.nodeid for r in failed}
    swa = failures["test_planted.py::test_case[forgets-swa-full-ragged]"]
    assert swa["failure"]["step"] == 0 and swa["failure"]["layer"] is None
    assert swa["failure"]["batch"] == "2 requests (2 ctx, 0 gen), seq_lens [200, 65], no cache"
    assert swa["failure"]["layer_spec"] == CATALOG["swa-full-ragged"].layer().describe()
    assert swa["failure"]["summary"].startswith("swa-full-ragged (full mask, window_left 48, ")
    rerun = swa["rerun"]
    assert rerun.startswith("python3 -m pytest 'test_planted.py::test_case[forgets-swa-full-ragged]' ")
    again = subprocess.run(rerun.replace("python3", sys.executable, 1), shell=True, cwd=pytester.path,
                           capture_output=True, text=True)
    assert again.returncode == 1, again.stdout[-2000:]
    assert "1 failed" in again.stdout and swa["failure"]["summary"] in again.stdout


def test_xdist_workers_results_are_merged(pytester, planted):
    result = pytester.runpytest_subprocess(BACKENDS, CASES, "-n", "2", "--attn-report=r.json",
                                           "--attn-report=r.html", "--junitxml=j.xml", "-p", "no:randomly")
    outcomes = outcomes_from_junit(pytester.path / "j.xml")
    assert len(outcomes) == 5 * 5 + 1 and "gw" in result.stdout.str()
    assert_report_matches(pytester.path / "r.json", outcomes)
    assert_report_matches(pytester.path / "r.html", outcomes)


@pytest.mark.attn_long
def test_isolated_childrens_results_are_merged(pytester, planted):
    small = "--attn-cases=hd64-ragged,swa-full-ragged"
    pytester.makeconftest(RECORDER)
    result = pytester.runpytest_subprocess("--attn-backend=good,forgets,risky", small, "--attn-isolate=all",
                                           "--attn-report=r.json", "--attn-report=r.md", "-p", "no:randomly",
                                           "-p", "no:cacheprovider", "-k", "test_case")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    outcomes = outcomes_from_recorder(pytester.path / "logged.jsonl")
    assert Counter(e["outcome"] for e in outcomes.values()) == Counter(passed=3, failed=2, skipped=1)
    assert_report_matches(pytester.path / "r.json", outcomes)
    assert_report_matches(pytester.path / "r.md", outcomes)


# -- optional sections -------------------------------------------------------------------------------
EXTRA_DATA_TEST = """
def test_records(attn_backend, record_property):
    record_property("attn_kernels", ["fmha_v2_" + attn_backend.name, "xqa"])
    record_property("attn_determinism", {"property": "batch-invariant", "holds": attn_backend.name == "good",
                                         "detail": "row 0 alone differs" if attn_backend.name != "good" else ""})
"""
PLAIN_TEST = """
def test_plain(attn_backend):
    pass
"""


def test_determinism_and_kernel_sections_appear_only_when_the_run_has_that_data(pytester, planted):
    pytester.makepyfile(test_extra=EXTRA_DATA_TEST, test_plain=PLAIN_TEST)
    pytester.runpytest("--attn-backend=good,narrow", "test_extra.py", "--attn-report=x.json", "--attn-report=x.html",
                       "--attn-report=x.md")
    pytester.runpytest("--attn-backend=good,narrow", "test_plain.py", "--attn-report=p.json", "--attn-report=p.html",
                       "--attn-report=p.md")
    with_data = json.loads((pytester.path / "x.json").read_text())
    without = json.loads((pytester.path / "p.json").read_text())
    assert with_data["kernels"] == {"good": {"fmha_v2_good": 1, "xqa": 1}, "narrow": {"fmha_v2_narrow": 1, "xqa": 1}}
    assert with_data["determinism"] == {
        "good": {"batch-invariant": {"holds": 1, "fails": 0, "details": []}},
        "narrow": {"batch-invariant": {"holds": 0, "fails": 1, "details": ["row 0 alone differs"]}}}
    assert "kernels" not in without and "determinism" not in without
    for name, present in (("x", True), ("p", False)):
        html = (pytester.path / f"{name}.html").read_text()
        md = (pytester.path / f"{name}.md").read_text()
        assert ('id="kernels"' in html, 'id="determinism"' in html) == (present, present)
        assert ("### Kernels each backend ran" in md, "### Determinism" in md) == (present, present)
    assert "fmha_v2_narrow" in (pytester.path / "x.html").read_text()


# -- benchmarks --------------------------------------------------------------------------------------
def test_a_benchmark_run_reports_the_seed_table_crossovers_plot_and_spread(pytester, monkeypatch):
    """The bundled seed benchmarks on CPU (small sizes, few samples), torch and flex."""
    import base64

    from pytest_attn.bench.compare import load_run, pair_lines, sweeps

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark switches itself off

    result = pytester.runpytest("--pyargs", "pytest_attn.suite.test_benchmarks", "-m", "attn_bench",
                                "--attn-backend=torch,flex", "--attn-bench-warmup=1", "--attn-bench-iters=3",
                                "--benchmark-json=b.json", "--attn-report=r.html", "--attn-report=r.json",
                                "--attn-report=r.md", "-p", "no:randomly")
    result.assert_outcomes(passed=6)
    saved = json.loads((pytester.path / "b.json").read_text())
    html = (pytester.path / "r.html").read_text()
    reader = html_tables(html)
    # the seed table, per regime: one row per size and mix, one column per backend, pytest-benchmark's medians
    graph = next(t for t in reader.tables if [c for c, _ in t["rows"][0]["cells"]] == ["seq_len", "flex", "torch"])
    shown = {(r["cells"][0][0], b): float(c) for r in graph["rows"][1:]
             for b, (c, _) in zip(("flex", "torch"), r["cells"][1:])}
    for row in saved["benchmarks"]:
        info = row["extra_info"]
        label = str(info["seq_len"]) if "seq_len" in info else f"{info['label']} ({info['tokens']} tokens, ragged)"
        assert shown[(label, info["backend"])] == pytest.approx(info["device_ms"], abs=6e-5)
    # crossovers: compare.py's own words for the run
    run = load_run(pytester.path / "b.json")
    for line in pair_lines(next(iter(sweeps(run, "device").values()))):
        assert line in html
    # the plot, embedded
    [plot] = [src for src in reader.images if src.startswith("data:image/png;base64,")]
    assert base64.b64decode(plot.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # the spread of each row: pytest-benchmark's statistics
    spread = next(t for t in reader.tables if [c for c, _ in t["rows"][0]["cells"]][:3] == ["backend", "row", "metric"])
    assert len(spread["rows"]) - 1 == len(saved["benchmarks"])
    medians = sorted(round(r["stats"]["median"] * 1e3, 4) for r in saved["benchmarks"])
    assert sorted(float(r["cells"][4][0]) for r in spread["rows"][1:]) == pytest.approx(medians, abs=1e-4)
    # the Markdown links the plot written beside it
    assert "![µs per token against seq_len](r.png)" in (pytester.path / "r.md").read_text()
    assert (pytester.path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # and `pytest-attn report` reads pytest-benchmark's own file
    from pytest_attn.cli.main import main

    assert main(["report", str(pytester.path / "b.json"), "-o", str(pytester.path / "from-bench.html")]) == 0
    assert "Benchmarks" in (pytester.path / "from-bench.html").read_text()
    # or adds its rows to a run's report that has none
    pytester.makepyfile(test_plain=PLAIN_TEST)
    pytester.runpytest("--attn-backend=torch", "test_plain.py", "--attn-report=plain.json")
    assert "benchmarks" not in json.loads((pytester.path / "plain.json").read_text())
    assert main(["report", str(pytester.path / "plain.json"), "--benchmarks", str(pytester.path / "b.json"),
                 "-o", str(pytester.path / "plain.md")]) == 0
    assert "### Benchmarks" in (pytester.path / "plain.md").read_text()


# -- pytest-attn report ------------------------------------------------------------------------------
def test_two_runs_side_by_side_mark_the_cells_that_changed(pytester, planted, monkeypatch, capsys):
    pytester.runpytest(BACKENDS, CASES, "--attn-report=a.json")
    monkeypatch.setenv("PLANTED_FIXED", "1")  # the next release fixes forgets
    pytester.runpytest(BACKENDS, CASES, "--attn-report=b.json")
    a, b = (json.loads((pytester.path / n).read_text()) for n in ("a.json", "b.json"))
    cells_a, cells_b = normalise(matrix_from_json(a)), normalise(matrix_from_json(b))
    changed = {key for key in set(cells_a) | set(cells_b) if cells_a.get(key) != cells_b.get(key)}
    assert changed and {backend for _, backend in changed} == {"forgets"}
    from pytest_attn.cli.main import main

    assert main(["report", str(pytester.path / "a.json"), str(pytester.path / "b.json"), "--labels", "v1,v2",
                 "-o", str(pytester.path / "d.html")]) == 0
    table = next(t for t in html_tables((pytester.path / "d.html").read_text()).tables if t["class"] == "matrix")
    header = [c for c, _ in table["rows"][0]["cells"]]
    outlined = {(row["cells"][0][0], header[i]) for row in table["rows"][1:]
                for i, (_, attrs) in enumerate(row["cells"]) if "changed" in (attrs.get("class") or "").split()}
    assert outlined == changed
    capsys.readouterr()
    assert main(["report", str(pytester.path / "a.json"), str(pytester.path / "b.json")]) == 0
    md = capsys.readouterr().out
    assert f"**{len(changed)} cell(s) changed**" in md
    assert "| `test_planted.py::test_case[forgets-swa-full-ragged]` | failed | passed |" in md


@pytest.mark.parametrize("args, message", [
    (["nothing.json"], "nothing.json: cannot read it"),
    (["not-a-run.json"], "neither a pytest-attn report"),
    (["a.json", "a.json", "a.json"], "3 runs given: give one run, or two"),
    (["a.json", "-o", "out.txt"], "out.txt: the suffix picks the format"),
    (["a.json", "a.json", "--benchmarks", "x"], "--benchmarks adds benchmark rows to one run"),
])
def test_command_errors_are_one_line_and_exit_4(tmp_path, monkeypatch, capsys, args, message):
    from pytest_attn.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-run.json").write_text('{"hello": 1}')
    (tmp_path / "a.json").write_text(json.dumps({"format": "pytest-attn-report", "version": 1, "environment": {},
                                                 "tests": []}))
    assert main(["report", *args]) == 4
    err = capsys.readouterr().err
    assert err.startswith("pytest-attn report: ") and message in err and err.count("\n") == 1


def test_a_markdown_report_lists_the_first_failures_and_says_how_many_more():
    """A pull-request comment has a size limit; the .html and .json keep every failure."""
    from pytest_attn.report.render import MD_FAILURES_SHOWN, render_text

    tests = [{"nodeid": f"t.py::test[x-{i}]", "test": "test", "backend": "x", "case": None, "tags": [],
              "outcome": "failed", "failure": {"summary": f"wrong {i}"}, "rerun": f"python -m pytest t.py -k {i}"}
             for i in range(MD_FAILURES_SHOWN + 5)]
    data = {"format": "pytest-attn-report", "version": 1, "environment": {}, "tests": tests}
    md, html = render_text(data, "md"), render_text(data, "html")
    assert md.count("- **F") == MD_FAILURES_SHOWN and "- … and 5 more: the report's .html or .json" in md
    assert html.count('class="failure"') == MD_FAILURES_SHOWN + 5


# -- the option ----------------------------------------------------------------------------------------
def test_a_report_path_without_a_known_suffix_is_a_usage_error(pytester, planted):
    result = pytester.runpytest("--attn-backend=good", "--attn-report=r.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-attn: --attn-report=r.txt: the suffix picks the format; give a path "
                                 "ending in .htm, .html, .json, .md"])


def test_a_run_that_tested_nothing_it_named_says_so_in_the_report(pytester, planted):
    result = pytester.runpytest("--attn-backend=ghost", CASES, "--attn-report=r.md")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    md = (pytester.path / "r.md").read_text()
    assert "**FAILED: --attn-backend=ghost ran none of its 5 tests: all skipped" in md
    assert "exit status 1" in md


def test_without_the_option_nothing_is_collected_or_written(pytester, planted):
    pytester.runpytest("--attn-backend=good", "--attn-cases=hd64-ragged")
    assert not list(pytester.path.glob("*.html")) and not list(pytester.path.glob("*.json"))


# -- pytest-html ---------------------------------------------------------------------------------------
def test_the_matrix_goes_into_pytest_htmls_summary_through_its_hook(pytester, planted):
    """The hook itself, as pytest-html calls it (whether or not pytest-html is installed here)."""
    from pytest_attn.plugin.run_report import RunReport

    captured = {}

    class Grab:
        @pytest.hookimpl(trylast=True)
        def pytest_sessionfinish(self, session):
            plugin = session.config.pluginmanager.get_plugin(RunReport.name)
            prefix = []
            plugin.pytest_html_results_summary(prefix=prefix, summary=[], postfix=[], session=session)
            captured["fragment"] = prefix[0]

    result = pytester.runpytest(BACKENDS, CASES, "--attn-report=r.json", plugins=[Grab()])
    outcomes = outcomes_from_reports(result.reprec.getreports("pytest_runtest_logreport"))
    assert normalise(matrix_from_html(captured["fragment"])) == normalise(expected_cells(outcomes))
    assert "<body" not in captured["fragment"]  # a fragment, with its style scoped to the matrix


def test_pytest_html_report_shows_the_matrix(pytester, planted):
    pytest.importorskip("pytest_html", reason="pytest-html is optional; the hook itself is tested above")
    result = pytester.runpytest_subprocess(BACKENDS, CASES, "-p", "pytest_html", "--html=h.html")
    assert result.ret == 1  # forgets fails
    html = (pytester.path / "h.html").read_text()
    assert "pytest-attn support matrix" in html and 'class="matrix"' in html


def test_the_suites_own_kernel_and_property_tests_fill_the_reports_sections(pytester, flex_compilation_imported):
    """Not a synthetic property: what test_kernels and test_properties really record reaches the
    report (kernel names with launch counts, one determinism entry per property)."""
    result = pytester.runpytest("--pyargs", "pytest_attn.suite.test_kernels", "pytest_attn.suite.test_properties",
                                "--attn-backend=torch,flex", "--attn-cases=hd64-ragged", "--attn-report=r.json",
                                "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    data = json.loads((pytester.path / "r.json").read_text())
    for backend in ("torch", "flex"):
        kernels = data["kernels"][backend]
        assert kernels and not {"step", "plan", "kernels"} & set(kernels), kernels
        assert all(isinstance(n, int) and n >= 1 for n in kernels.values())
        properties = data["determinism"][backend]
        assert len(properties) == 2 and all(p["holds"] + p["fails"] == 1 for p in properties.values()), properties
