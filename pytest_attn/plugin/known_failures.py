"""Known failures in a run (``--attn-known-failures``; data in pytest_attn.env.known_failures).

A listed failure is a strict expected failure:

- a backend's refusal that cites only known-failure entries runs anyway with those entries lifted
  and must fail: it is reported as xfailed with the entry and its upstream thread, and if it passes
  the test fails: "fixed upstream: remove the entry". Entries with ``run = false`` (the failure
  crashes the process) are reported xfailed without running;
- a test of a (backend, case) that an entry lists by name must fail the same way.

Either way, only a test that launches the kernel (calls the backend's ``forward``) can show a
listed failure or its fix: a plan-only test of a listed (backend, case) passes or fails as it
always did, and one refused for a known failure is skipped as it always was.

Anything not listed that fails is a regression: it fails as it always did.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import pytest

from pytest_attn.env import known_failures as known


def configure(config) -> None:
    """The user's files, checked now: a malformed one is a one-line usage error (exit 4)."""
    from pytest_attn.plugin.options import split_list

    try:
        known.use_user_files(split_list(config, "attn_known_failures"))
    except known.KnownFailuresFileError as exc:
        raise pytest.UsageError(f"pytest-attn: {exc}; fix it or leave --attn-known-failures out") from None
    config.add_cleanup(lambda: known.use_user_files([]))  # the next run in this process starts without them


def _what_failed(exc: BaseException) -> str:
    summary = getattr(exc, "summary", None) or (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {summary}"[:300]


def _cite(entries) -> str:
    return "; ".join(f"known failure {e.id} ({e.url})" for e in entries)


def _fixed(item, entries) -> None:
    from pytest_attn.plugin.collected import backend_name_of

    sources = ", ".join(sorted({e.source for e in entries}))
    pytest.fail(f"fixed upstream: {_cite(entries)} now passes on {backend_name_of(item) or 'this backend'}: remove "
                f"the entry from {sources}", pytrace=False)


def _arch(item) -> Optional[str]:
    from pytest_attn.plugin.session import attn_session_of

    session = attn_session_of(item.config)
    if session.device_type != "cuda":
        return None
    import torch

    return known.arch_name(torch.cuda.get_device_capability(session.device))


def listed_for(item) -> list:
    """The entries naming this test's (backend, case) that hold here."""
    from pytest_attn.plugin.collected import backend_name_of, case_of

    backend, case = backend_name_of(item), case_of(item)
    if backend is None or case is None or item.get_closest_marker("attn_no_output_check") is not None:
        return []
    return known.active().for_case(backend, case.name, version_of=known.installed_version, arch=_arch(item))


@contextlib.contextmanager
def _forward_calls(item):
    """Counts the calls of this test's backend's forward (a list of one count) while it runs."""
    from pytest_attn.plugin.collected import param

    backend, calls = param(item, "attn_backend"), [0]
    if backend is None:
        yield calls
        return
    own = backend.__dict__.get("forward")
    inner = getattr(backend, "forward")

    def counting(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    try:
        object.__setattr__(backend, "forward", counting)
    except (AttributeError, TypeError):  # a backend with __slots__: assume every test launches
        yield [1]
        return
    try:
        yield calls
    finally:
        if own is None:
            del backend.__dict__["forward"]
        else:
            object.__setattr__(backend, "forward", own)


@contextlib.contextmanager
def expected_failures(item):
    """Around a test's call: a (backend, case) that an entry lists must fail, when the test runs
    its kernel."""
    entries = listed_for(item)
    if not entries:
        yield
        return
    with _forward_calls(item) as calls:
        try:
            yield
        except (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception, KeyboardInterrupt):
            raise
        except Exception as exc:
            from pytest_attn.core.errors import UnsupportedCase

            if isinstance(exc, UnsupportedCase) or not calls[0]:
                raise  # refused, or failed before any launch: not the listed failure
            pytest.xfail(f"{_cite(entries)}: still fails: {_what_failed(exc)}")
    if calls[0]:
        _fixed(item, entries)


def refused_as_known(item, refusal):
    """A backend's refusal (UnsupportedCase) that cites known failures only: xfail without running
    (``run = false``), or run with the entries lifted and expect it to fail. Returns the refusal to
    skip on otherwise (a refusal with other reasons, or a new one once the entries are lifted)."""
    from pytest_attn.core.errors import UnsupportedCase

    cited, other = known.active().in_reasons(refusal.reasons)
    if not cited or other or item.get_closest_marker("attn_no_output_check") is not None:
        return refusal  # a test that does not compare outputs cannot show a wrong-output failure
    not_run = [e for e in cited if not e.run]
    if not_run:
        pytest.xfail(f"{_cite(not_run)}: not run (it crashes the process): {refusal.reasons[0]}")
    with known.lift(e.id for e in cited), _forward_calls(item) as calls:
        try:
            item.runtest()
        except UnsupportedCase as again:
            return again
        except (pytest.skip.Exception, pytest.xfail.Exception, pytest.exit.Exception, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not calls[0]:
                return refusal  # failed before any launch: it says nothing of the known failure
            pytest.xfail(f"{_cite(cited)}: still fails: {_what_failed(exc)}")
    if not calls[0]:
        return refusal  # a test that launches nothing (a plan check): skipped as it always was
    _fixed(item, cited)
