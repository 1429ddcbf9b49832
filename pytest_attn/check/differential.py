"""One case through every backend: each output against the reference and against each other, so a
user sees which backends disagree and by how much (the route that found flashinfer #1193, a soft-cap
regression seen as fa2 against fa3 and triton, and flashinfer #1663, cutlass against fa2 at head dim 192/128).

``pytest-attn differential CASE`` prints the table; the suite's ``test_differential`` runs it for a
few cases with every backend of the run.

Each backend is run on its own: one that is unavailable or cannot run the case is listed as skipped
with its reason, one that raises or breaks its contract is listed as broken with what broke, and
the others are compared all the same. An output with NaN or Inf agrees with nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pytest_attn.cases.case import BatchCase
from pytest_attn.core.contract import Availability, Backend
from pytest_attn.core.errors import UnsupportedCase


@dataclass
class BackendRun:
    name: str
    outs: list = field(default_factory=list)  # one output per (step, layer), on the CPU in float32
    max_abs_err: float = 0.0  # against the reference, worst step
    rel_l2_err: float = 0.0
    passed: bool = True
    skipped: str = ""  # the reasons, when the backend is unavailable or cannot run the case
    broke: str = ""  # what broke, when the backend raised or broke its contract (a failure of its own)
    finite: bool = True  # no NaN or Inf in any output
    trace: str = ""  # the traceback of what broke, where it raised (the suite's test shows it in its report)


@dataclass
class Differential:
    case: str
    runs: list[BackendRun]

    @property
    def ran(self) -> list[BackendRun]:
        """The backends that ran the case to the end (not skipped, not broken)."""
        return [r for r in self.runs if not r.skipped and not r.broke]

    @property
    def skipped(self) -> list[BackendRun]:
        return [r for r in self.runs if r.skipped]

    def problems(self) -> list[str]:
        """One line per backend that broke or disagrees with the reference, naming it alone."""
        found = [f"{r.name} broke: {r.broke}" for r in self.runs if r.broke]
        found += [f"{r.name} disagrees with the reference (relative L2 {r.rel_l2_err:.3e})"
                  + ("" if r.finite else ", with NaN or Inf in its output") for r in self.ran if not r.passed]
        return found

    def pairwise(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(a, b) -> (max |a - b|, relative L2 of a - b), worst over steps and layers. An output with
        NaN or Inf is infinitely far from every other: it never agrees."""
        ran = self.ran
        return {(a.name, b.name): pair_distance(a, b) for i, a in enumerate(ran) for b in ran[i + 1:]}

    def lines(self) -> list[str]:
        out = [f"case {self.case}: each backend against the reference (max |out - ref|, relative L2, verdict)"]
        width = max([len(r.name) for r in self.runs] + [8])
        for r in self.runs:
            if r.broke:
                out.append(f"  {r.name:<{width}}  BROKE: {r.broke}")
            elif r.skipped:
                out.append(f"  {r.name:<{width}}  skipped: {r.skipped}")
            else:
                out.append(f"  {r.name:<{width}}  {r.max_abs_err:.3e}  {r.rel_l2_err:.3e}  "
                           f"{'passes' if r.passed else 'FAILS'}{'' if r.finite else ' (NaN or Inf in its output)'}")
        pairs = self.pairwise()
        if pairs:
            out.append("backends against each other (max |a - b|, relative L2):")
            for (a, b), (abs_err, rel) in sorted(pairs.items(), key=lambda kv: -kv[1][1]):
                nan = "  (NaN or Inf: never agrees)" if math.isinf(rel) else ""
                out.append(f"  {a} vs {b}: {abs_err:.3e}  {rel:.3e}{nan}")
        return out


def pair_distance(a: BackendRun, b: BackendRun) -> tuple[float, float]:
    """(max |a - b|, relative L2 of a - b against the larger of the two), worst over the outputs:
    inf where either has NaN or Inf (NaN compares as no distance at all, so it would agree with
    anything), and against the larger norm so that an all-zero output does not agree with a real one."""
    if not (a.finite and b.finite):
        return math.inf, math.inf
    worst_abs = worst_rel = 0.0
    for x, y in zip(a.outs, b.outs):
        diff = x - y
        worst_abs = max(worst_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        norm = max(float(x.norm()), float(y.norm()))
        worst_rel = max(worst_rel, float(diff.norm()) / norm if norm else 0.0)
    return worst_abs, worst_rel


def failure_line(exc: BaseException) -> str:
    """One line saying what broke: the first line of a pytest-attn error (guard's names the backend
    and the method), else the exception's type and first line (an assertion in the backend's code)."""
    from pytest_attn.core.errors import AttnCheckFailure, AttnError

    if isinstance(exc, AttnCheckFailure):
        return f"failed a check: {exc.summary}"
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, AttnError) and first else f"{type(exc).__name__}: {first or '(no message)'}"


def backend_trace(exc: BaseException) -> str:
    """The traceback of what broke, its chained causes included, without pytest-attn's own frames:
    what is left is the backend's code (and the libraries it called), where the fix goes."""
    import traceback
    from pathlib import Path

    ours = str(Path(__file__).resolve().parents[1])  # all of pytest_attn
    found = traceback.TracebackException.from_exception(exc)
    link, seen = found, set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.stack = traceback.StackSummary.from_list(
            [frame for frame in link.stack if not str(Path(frame.filename).resolve()).startswith(ours)])
        link = link.__cause__ or link.__context__
    return "".join(found.format())


def run_backend(backend: Backend, case: BatchCase, availability: Availability, *, device, seed: int) -> BackendRun:
    """One backend's row: skipped (unavailable, or cannot run the case), broken, or its outputs."""
    from pytest_attn.check.harness import run_case
    from pytest_attn.env.registry import broken_reason

    run = BackendRun(backend.name)
    broken = broken_reason(backend, availability)
    if broken:
        run.broke = broken
        return run
    if not availability:
        run.skipped = f"unavailable here: {availability.reason}"
        return run
    try:
        results = run_case(backend, case, device=device, seed=seed)
    except UnsupportedCase as exc:
        run.skipped = "; ".join(exc.reasons)
        return run
    except Exception as exc:  # calls.BackendError, a failed harness check, an assertion: this backend's failure
        run.broke = failure_line(exc)
        run.trace = backend_trace(exc)
        return run
    run.outs = [r.out.detach().float().cpu() for r in results]
    run.finite = all(bool(o.isfinite().all()) for o in run.outs)
    run.max_abs_err = max(r.comparison.max_abs_err for r in results)
    # the reference comparison measures its relative L2 over the finite elements; NaN or Inf is infinitely far
    run.rel_l2_err = max(r.comparison.rel_l2_err for r in results) if run.finite else math.inf
    run.passed = run.finite and all(r.passed for r in results)
    return run


def differential(backends: Sequence[Backend], case: BatchCase, *, device="cpu", seed: int = 0,
                 availability: Optional[Callable[[Backend], Availability]] = None) -> Differential:
    """Run ``case`` through each backend, in order, each on its own (see the module docstring).
    ``availability`` answers whether a backend runs here (default: calls.availability; the suite
    passes its session's, which caches it)."""
    from pytest_attn.core import calls

    available = availability or calls.availability
    return Differential(case.name, [run_backend(b, case, available(b), device=device, seed=seed) for b in backends])
