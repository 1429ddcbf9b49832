"""A/B timing: two sides measured alternately, in rounds, so that drift (clocks, thermals, a noisy
neighbour) falls on both alike; then the gate's verdict (pytest_attn.bench.gate) per row and regime.

A side is a backend in this process (``measure_rounds_in_process``), or a backend in another
environment or commit, timed by one subprocess per round (``ab_worker``, run by ``pytest-attn ab``).
Each round re-plans and warms up before timing, so the side measured second in a round gains nothing
from the first. Sides swap order every round; in one process the eager samples of the two sides are
also taken in turn, one at a time (host time drifts over seconds). No pytest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from pytest_attn.bench.gate import REGIMES, RowSamples, compare_rows, row_samples
from pytest_attn.bench.timing import HOST_REFERENCE

DEFAULT_ROUNDS = 6  # rounds per side
DEFAULT_ITERS = 15  # timed samples per row per round
CPU_DEFAULT_SEQ_LENS = (64, 128)
CUDA_DEFAULT_SEQ_LENS = (1024, 4096)


@dataclass
class SideSamples:
    """Every sample one side timed: row label -> regime (and HOST_REFERENCE, taken in turn with the
    eager samples) -> seconds per call."""

    rows: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    paired: tuple = ()  # regimes whose samples were taken in turn with the other side's, sample i at one moment

    def add(self, label: str, samples: dict) -> None:
        row = self.rows.setdefault(label, {r: [] for r in (*REGIMES, HOST_REFERENCE)})
        for name in row:
            row[name].extend(samples.get(name) or ())

    def row_samples(self) -> list[RowSamples]:
        return [row for label, per in self.rows.items()
                for row in row_samples(label, per, [r for r in REGIMES if per[r]])]


def compare_sides(base: SideSamples, head: SideSamples, thresholds=None):
    """The gate's verdicts of HEAD against BASE (pytest_attn.bench.gate.compare_rows), pair by pair
    in the regimes both sides sampled in turn."""
    return compare_rows(base.row_samples(), head.row_samples(), thresholds,
                        paired=tuple(set(base.paired) & set(head.paired)))


def vit_batch(seq_len: int, device: str, seed: int = 0):
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS
    from pytest_attn.check.batch import build_batch

    return build_batch([seq_len], num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                       device=device, seed=seed)


def measure_row(backend, batch, settings) -> dict:
    """{regime: samples} of one measure_backend of one row."""
    from pytest_attn.bench.measure import measure_backend, timing_samples

    _, timing, _ = measure_backend(backend, batch, settings)
    return timing_samples(timing)


def row_label(seq_len: int) -> str:
    return f"vit-table seq {seq_len}"


def measure_rounds_in_process(base, head, seq_lens: Sequence[int], device: str, settings, rounds: int,
                              progress: Optional[Callable[[str], None]] = None) -> tuple[SideSamples, SideSamples]:
    """Both backends on every row, ``rounds`` times, the order of the two swapped every round. Device
    time comes from each side's own measurement; eager time from samples the two sides take in turn,
    one at a time, with the host reference (bench.timing.interleaved_eager_samples), so that the
    host's drift falls on both; each side keeps the reference samples of its turns."""
    from pytest_attn.bench.measure import measure_backend
    from pytest_attn.bench.timing import calls_per_sample, host_reference_call, interleaved_eager_samples

    sides = {"base": (base, SideSamples(paired=("eager",))), "head": (head, SideSamples(paired=("eager",)))}
    batches = {n: vit_batch(n, device) for n in seq_lens}
    reference = {HOST_REFERENCE: host_reference_call(device)} if str(device).startswith("cuda") else {}
    device_only = dataclasses.replace(settings, eager=False)  # the eager samples are taken below, in turn
    for index in range(rounds):
        order = ("base", "head") if index % 2 == 0 else ("head", "base")
        for seq_len, batch in batches.items():
            timed = {}
            for side in order:
                backend, samples = sides[side]
                _, timing, forward = measure_backend(backend, batch, device_only)
                samples.add(row_label(seq_len), {"device": list(timing.device_s), "eager": []})
                timed[side] = (forward, calls_per_sample(timing.host_median_s, settings.cold_l2))
            eager = interleaved_eager_samples({**timed, **reference}, settings.iters, device, settings.cold_l2)
            for side in order:
                sides[side][1].add(row_label(seq_len), {"eager": eager[side],
                                                        HOST_REFERENCE: eager.get(HOST_REFERENCE, ())})
        if progress:
            progress(f"round {index + 1}/{rounds} done")
    return sides["base"][1], sides["head"][1]
