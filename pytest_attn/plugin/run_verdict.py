"""Whether a run tested what it named. A CI job that names its backend (``--attn-backend=mykernel``)
or its cases (``--attn-cases=swa``) must not go green having tested none of it:

- a named backend whose every test was skipped (unavailable here, or no case it supports) fails
  the run, with one line saying so and why; ``--attn-allow-unavailable`` accepts a named backend
  that is unavailable on this machine (CPU-only CI naming a GPU backend);
- ``--attn-cases`` that no collected test runs fails the run.

A broken backend (its package fails to import, its available() raises) never gets here: naming one
is a usage error at configure time (session.check_named). Outcomes come from the closing section's
Summary, which sees every report (xdist workers', isolated children's), so the verdict is the
controller's alone.
"""
from __future__ import annotations

from typing import Optional

import pytest

from pytest_attn.plugin.collected import CASE_PROPERTY


class RunVerdict:
    """Registered with the Summary; at the end of the run, fails it when it tested nothing named."""

    name = "attn-run-verdict"

    def __init__(self, config, session, summary):
        self.config, self.session, self.summary = config, session, summary
        self.case_tests: set[str] = set()
        self.problems: list[str] = []

    def pytest_runtest_logreport(self, report):
        if any(key == CASE_PROPERTY for key, _ in getattr(report, "user_properties", ())):
            self.case_tests.add(report.nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if hasattr(self.config, "workerinput") or not _ran_tests(self.config):
            return
        if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            return  # failed, interrupted or stopped early: the run is red already, and why is said above
        self.problems = [*self._backends_that_ran_nothing(), *self._cases_that_ran_nothing()]
        if self.problems:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        for problem in self.problems:
            terminalreporter.write_line(f"pytest-attn: FAILED: {problem}", red=True, bold=True)

    def _backends_that_ran_nothing(self) -> list[str]:
        problems = []
        for backend in self.session.named:
            outcomes = self.summary.outcomes.get(backend.name, {})
            if not outcomes or any(o != "skipped" for o in outcomes.values()):
                continue  # not collected at all (-k, a single test ID), or it ran
            unavailable = not self.session.availability(backend)
            if unavailable and self.session.allow_unavailable:
                continue
            problems.append(f"--attn-backend={backend.name} ran none of its {len(outcomes)} tests: all skipped"
                            f"{_top_reason(self.summary.skips.get(backend.name))}. "
                            + ("Run where it is available, or pass --attn-allow-unavailable to accept that"
                               if unavailable else "Name cases it supports (--attn-cases), or another backend"))
        return problems

    def _cases_that_ran_nothing(self) -> list[str]:
        if not self.session.case_filter or self.case_tests:
            return []
        given = f"--attn-cases={','.join(self.session.case_filter)}"
        return [f"{given} selected no test: {self._why_no_case_ran()}"]

    def _why_no_case_ran(self) -> str:
        cases, limit = self.session.cases(), self.session.max_tokens
        if limit and cases and all(c.max_tokens > limit for c in cases):
            return (f"its {len(cases)} case(s) are all longer than the {limit}-token limit "
                    "(--attn-max-tokens=0 runs them)")
        return ("no collected test runs one of its cases: a test's @pytest.mark.attn_cases may leave them out, or no "
                "test takes the attn_case fixture (the bundled suite's do: --attn-suite=on adds it)")


def _ran_tests(config) -> bool:
    option = config.option
    return not any(getattr(option, flag, False) for flag in ("collectonly", "setuponly", "setupplan"))


def _top_reason(skips: Optional[dict]) -> str:
    if not skips:
        return ""
    reason, count = max(skips.items(), key=lambda kv: kv[1])
    more = f" (and {len(skips) - 1} other reason(s))" if len(skips) > 1 else ""
    return f" ({count}: {reason}{more})"
