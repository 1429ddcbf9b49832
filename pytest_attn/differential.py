"""One case through every backend: each output against the reference and against each other, so a
user sees which backends disagree and by how much (the route that found flashinfer #1193, a soft-cap
regression seen as fa2 against fa3 and triton, and #1663, cutlass against fa2 at head dim 192/128).

``pytest-attn differential CASE`` prints the table; the suite's ``test_differential`` runs it for a
few cases with every backend of the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .cases import BatchCase
from .contract import Backend
from .errors import UnsupportedCase


@dataclass
class BackendRun:
    name: str
    outs: list = field(default_factory=list)  # one output per (step, layer), on the CPU in float32
    max_abs_err: float = 0.0  # against the reference, worst step
    rel_l2_err: float = 0.0
    passed: bool = True
    skipped: str = ""  # the reasons, when the backend cannot run the case
    broke: str = ""  # what broke, when the backend raised or broke its contract (a failure of its own)

    @property
    def finite(self) -> bool:
        import torch

        return all(bool(torch.isfinite(o).all()) for o in self.outs)


@dataclass
class Differential:
    case: str
    runs: list[BackendRun]

    @property
    def ran(self) -> list[BackendRun]:
        """The backends that ran the case to the end (not skipped, not broken)."""
        return [r for r in self.runs if not r.skipped and not r.broke]

    def problems(self) -> list[str]:
        """One line per backend that broke or disagrees with the reference, naming it alone."""
        found = [f"{r.name} broke: {r.broke}" for r in self.runs if r.broke]
        found += [f"{r.name} disagrees with the reference (relative L2 {r.rel_l2_err:.3e})"
                  + ("" if r.finite else ", with NaN or Inf in its output") for r in self.ran if not r.passed]
        return found

    def pairwise(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(a, b) -> (max |a - b|, relative L2 of a - b against a), worst over steps and layers. An
        output with NaN or Inf is infinitely far from every other: it never agrees."""
        found = {}
        ran = self.ran
        for i, a in enumerate(ran):
            for b in ran[i + 1:]:
                if not (a.finite and b.finite):
                    found[(a.name, b.name)] = (math.inf, math.inf)
                    continue
                worst_abs = worst_rel = 0.0
                for x, y in zip(a.outs, b.outs):
                    diff = (x - y)
                    worst_abs = max(worst_abs, float(diff.abs().max()) if diff.numel() else 0.0)
                    norm = float(x.norm())
                    worst_rel = max(worst_rel, float(diff.norm()) / norm if norm else 0.0)
                found[(a.name, b.name)] = (worst_abs, worst_rel)
        return found

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
                           f"{'passes' if r.passed else 'FAILS'}")
        pairs = self.pairwise()
        if pairs:
            out.append("backends against each other (max |a - b|, relative L2):")
            for (a, b), (abs_err, rel) in sorted(pairs.items(), key=lambda kv: -kv[1][1]):
                nan = "  (NaN or Inf: never agrees)" if math.isinf(rel) else ""
                out.append(f"  {a} vs {b}: {abs_err:.3e}  {rel:.3e}{nan}")
        return out


def differential(backends: Sequence[Backend], case: BatchCase, *, device="cpu", seed: int = 0) -> Differential:
    """Run ``case`` through each backend (skipping those that cannot run it, with their reasons; a
    backend that raises or breaks its contract is recorded as broken, and the others go on)."""
    from .errors import AttnError
    from .harness import run_case

    runs = []
    for backend in backends:
        run = BackendRun(backend.name)
        try:
            results = run_case(backend, case, device=device, seed=seed)
        except UnsupportedCase as exc:
            run.skipped = "; ".join(exc.reasons)
            runs.append(run)
            continue
        except AttnError as exc:  # guard.BackendError and the harness's own checks: this backend's failure
            run.broke = str(exc).strip().splitlines()[0]
            runs.append(run)
            continue
        run.outs = [r.out.detach().float().cpu() for r in results]
        run.max_abs_err = max(r.comparison.max_abs_err for r in results)
        run.rel_l2_err = max(r.comparison.rel_l2_err for r in results)
        run.passed = all(r.passed for r in results)
        runs.append(run)
    return Differential(case.name, runs)
