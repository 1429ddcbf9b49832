"""--attn-gate=BASELINE: the run ends with pytest-attn's performance gate (pytest_attn.bench.gate)
against a saved run: one table of the rows that regressed (ratio, interval, threshold, regime)
and a final line, and exit status 1, never a traceback. The rows are those this run's
``attn_benchmark`` timed (every sample of both regimes), compared with the baseline's saved
samples. A baseline from another machine or other versions is refused (exit 4, naming what
differs); CPU timings are shown but not gated without --attn-gate-cpu."""
from __future__ import annotations

from typing import Optional

import pytest

RESULT_KEY = pytest.StashKey[object]()  # GateResult, or the line saying why nothing was gated


def asked(config) -> bool:
    return config.getoption("attn_gate", None) is not None


def head_machine_info(config) -> dict:
    from pytest_attn.bench.machine import attn_machine_info
    from pytest_attn.plugin.session import attn_session_of

    return {"attn": attn_machine_info(attn_session_of(config).device)}


def run_gate(config) -> tuple[Optional[object], str, int]:
    """(result or None, a line when there is no result, the exit status the gate asks for)."""
    from pytest_attn.bench.gate import GateError, SavedRun, gate, load_saved, rows_of
    from pytest_attn.plugin.benchmark import recorded_rows
    from pytest_attn.plugin.options import gate_thresholds

    baseline = config.getoption("attn_gate")
    rows = recorded_rows(config)
    if not rows:
        return None, ("pytest-attn gate: FAILED: no attention benchmark was timed in this run, so nothing was gated; "
                      "run them (-m attn_bench, serially: no -n) with --attn-gate"), pytest.ExitCode.TESTS_FAILED
    head = SavedRun("this run", head_machine_info(config),
                    rows_of({"benchmarks": [{"fullname": name, "extra_info": info} for name, info in rows]}))
    try:
        base = load_saved(baseline)
        result = gate(base, head, thresholds=gate_thresholds(config),
                      gate_cpu=bool(config.getoption("attn_gate_cpu", False)))
    except GateError as exc:
        return None, f"pytest-attn gate: {exc}", pytest.ExitCode.USAGE_ERROR
    return result, base.path, pytest.ExitCode.TESTS_FAILED if result.failed else pytest.ExitCode.OK


def sessionfinish(session) -> None:
    config = session.config
    if not asked(config) or getattr(config, "workerinput", None) is not None:
        return
    result, text, status = run_gate(config)
    config.stash[RESULT_KEY] = (result, text)
    if status != pytest.ExitCode.OK and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = status


def terminal_summary(terminalreporter, config) -> None:
    from pytest_attn.bench.gate import summary_line, table

    found = config.stash.get(RESULT_KEY, None)
    if found is None:
        return
    result, text = found
    terminalreporter.section("pytest-attn performance gate")
    if result is None:
        terminalreporter.write_line(text)
        return
    shown = result.regressed
    for line in table(shown):
        terminalreporter.write_line(line)
    terminalreporter.write_line(summary_line(result, text))
