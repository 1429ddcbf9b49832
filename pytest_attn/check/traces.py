"""What really ran: the kernels a forward launched, recorded with ``torch.profiler`` (CUDA kernels
with their streams on a GPU; operator names such as ``aten::_scaled_dot_product_flash_attention_for_cpu``
on CPU), checked against the kernel families the backend declares for its plan
(:meth:`Backend.expected_kernels`).

A plan can say ``cudnn`` while fa2 runs, ``flash`` while SDPA falls back to math, and the output is
still right: only the trace says what ran. So a launch outside the declared families fails, naming
the kernel, and a declared family that launched nothing fails too. Data movement every backend does
(torch's own copy, fill, index, cat and sort kernels, CUB, memcpy/memset, Inductor's pointwise and
reduction kernels) is never attention and always allowed on CUDA; on CPU, where every operator is
recorded, only attention operators (``scaled_dot_product*``, flex) are judged.

The matching is pure (:func:`check_trace`, :func:`compare_replay`), so CPU tests cover it with
handwritten traces; :func:`record` is the only part that needs the profiler.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

#: CUDA kernels that only move data (torch's ATen kernels: copies, fills, indexing, cat, sort, the
#: softmax of a math path too; CUB; memcpy/memset records; Inductor's pointwise, reduction and
#: persistent-reduction kernels). Never attention; allowed beside any declaration.
GLUE_CUDA = (r"\bat::native::", r"\bat_cuda_detail::", r"\bcub::", r"^(void )?cub", r"^Memcpy", r"^Memset",
             r"^triton_(poi|per|red)_", r"^void at::", r"\bc10::")
#: CPU operators that compute attention: judged on CPU (every other operator is data movement).
ATTENTION_OPS_CPU = (r"scaled_dot_product", r"_flash_attention", r"_efficient_attention", r"_cudnn_attention",
                     r"FlexAttention", r"flex_attention")
NAME_WIDTH = 110  # a kernel name in a report, its template arguments elided


@dataclass(frozen=True)
class KernelFamily:
    """Kernels a backend may launch for a plan: ``patterns`` are regular expressions searched in the
    recorded names. A ``required`` family must launch at least once per traced forward."""

    name: str
    patterns: tuple[str, ...]
    required: bool = True

    def matches(self, kernel: str) -> bool:
        return any(re.search(p, kernel) for p in self.patterns)


def as_families(declared: Optional[Iterable]) -> Optional[tuple[KernelFamily, ...]]:
    """A backend's declaration as families: a string is a family of one pattern that need not launch."""
    if declared is None:
        return None
    families = []
    for item in declared:
        if isinstance(item, str):
            families.append(KernelFamily(item, (item,), required=False))
        elif isinstance(item, KernelFamily):
            families.append(item)
        else:
            raise TypeError(f"expected_kernels() returned {item!r}: give KernelFamily objects or pattern strings")
    return tuple(families)


def is_glue(name: str) -> bool:
    return any(re.search(p, name) for p in GLUE_CUDA)


def is_attention_op(name: str) -> bool:
    return any(re.search(p, name) for p in ATTENTION_OPS_CPU)


def shorten(name: str, width: int = NAME_WIDTH) -> str:
    """A kernel name for a report: 'void ' and template arguments elided, at most ``width`` characters."""
    name = name.removeprefix("void ")
    out, depth = [], 0
    for c in name:
        if c == "<":
            if depth == 0:
                out.append("<…>")
            depth += 1
        elif c == ">" and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
    text = "".join(out).strip()
    if text.endswith(")"):  # the parameter list: the last balanced (...), not "(anonymous namespace)"
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[i], 0)
            if depth == 0:
                text = text[:i].strip() if text[:i].strip() else text
                break
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass(frozen=True)
class Launch:
    """One kernel (or CPU operator) name, how many times it ran and on which streams."""

    name: str
    count: int
    streams: tuple[int, ...] = ()


@dataclass(frozen=True)
class KernelTrace:
    """What one traced call launched. ``device_type`` "cuda": kernels (and memcpy/memset records);
    "cpu": operators."""

    device_type: str
    launches: tuple[Launch, ...] = ()

    @classmethod
    def of(cls, device_type: str, names: Sequence[str], streams: Sequence[int] = ()) -> "KernelTrace":
        """A trace from names in launch order (tests write them by hand)."""
        counts: dict = {}
        where: dict = {}
        for i, name in enumerate(names):
            counts[name] = counts.get(name, 0) + 1
            if i < len(streams):
                where.setdefault(name, set()).add(streams[i])
        return cls(device_type, tuple(Launch(n, c, tuple(sorted(where.get(n, ())))) for n, c in counts.items()))

    def counts(self) -> dict:
        return {launch.name: launch.count for launch in self.launches}

    def relevant(self) -> tuple[Launch, ...]:
        """What a report shows: every kernel on CUDA but memcpy/memset; the attention operators on CPU."""
        if self.device_type == "cuda":
            return tuple(l for l in self.launches if not l.name.startswith(("Memcpy", "Memset")))
        return tuple(l for l in self.launches if is_attention_op(l.name))

    def attention(self) -> tuple[Launch, ...]:
        """The launches that are not data movement."""
        if self.device_type == "cuda":
            return tuple(l for l in self.launches if not is_glue(l.name))
        return self.relevant()

    def lines(self) -> list[str]:
        shown = self.relevant()
        if not shown:
            return [f"(no {'kernel' if self.device_type == 'cuda' else 'attention operator'} recorded)"]
        return [f"{l.count:>4}x {shorten(l.name)}" + (f"  [stream {','.join(map(str, l.streams))}]" if l.streams else "")
                for l in shown]

    def summary(self) -> str:
        """The attention kernels in one line: 'name x N; ...' (data movement left out)."""
        att = self.attention()
        if not att:
            return "no attention kernel recorded"
        return "; ".join(f"{shorten(l.name, 70)} x{l.count}" for l in att)

    def as_dict(self) -> dict:
        return {"device_type": self.device_type,
                "launches": [{"name": l.name, "count": l.count, "streams": list(l.streams)} for l in self.launches]}


def record(fn: Callable[[], object], device) -> KernelTrace:
    """Run ``fn`` under torch.profiler and return what it launched (synchronising a GPU first, so
    every kernel of the call is in the record)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    return from_events(prof.events(), "cuda" if cuda else "cpu")


def from_events(events, device_type: str) -> KernelTrace:
    """A trace from the profiler's events: device records on CUDA (their stream is
    ``device_resource_id``), operators on CPU."""
    names, streams = [], []
    want = "CUDA" if device_type == "cuda" else "CPU"
    for event in events:
        if str(getattr(event, "device_type", "")).split(".")[-1] != want:
            continue
        if device_type == "cpu" and getattr(event, "is_user_annotation", False):
            continue
        names.append(event.name)
        streams.append(int(getattr(event, "device_resource_id", 0) or 0) if device_type == "cuda" else 0)
    return KernelTrace.of(device_type, names, streams if device_type == "cuda" else ())


# -- the checks ------------------------------------------------------------------------------------
def check_trace(trace: KernelTrace, declared) -> list[str]:
    """How ``trace`` breaks the declaration (``Backend.expected_kernels(plan)``), one sentence each;
    [] when it keeps it or nothing is declared (None)."""
    families = as_families(declared)
    if families is None:
        return []
    if trace.device_type == "cuda":
        # Some kernels reach the profiler without a name (seen on an H200, torch 2.11: the GEMMs of
        # SDPA's math path at head dim 576): they cannot be judged by name, and are not called outside.
        outside = [l for l in trace.launches if l.name.strip() and not is_glue(l.name)
                   and not any(f.matches(l.name) for f in families)]
    else:
        outside = [l for l in trace.launches if is_attention_op(l.name) and not any(f.matches(l.name) for f in families)]
    problems = []
    declared_names = ", ".join(f.name for f in families) or "none"
    if outside:
        problems.append(f"launched {'; '.join(f'{shorten(l.name)} x{l.count}' for l in outside)}, outside the declared "
                        f"kernel families ({declared_names})")
    unnamed = any(not l.name.strip() for l in trace.launches)
    for family in families:
        if family.required and not unnamed and not any(family.matches(l.name) for l in trace.launches):
            problems.append(f"the declared family {family.name!r} launched nothing (patterns "
                            f"{', '.join(family.patterns)}); it ran: {trace.summary()}")
    return problems


def compare_replay(eager: KernelTrace, replay: KernelTrace) -> list[str]:
    """How a CUDA-graph replay's kernels differ from the eager call's (names and counts, memcpy and
    memset aside: a captured call copies nothing from the host); [] when they are the same."""
    def kernels(trace):
        return {l.name: l.count for l in trace.launches if not l.name.startswith(("Memcpy", "Memset"))}

    want, got = kernels(eager), kernels(replay)
    if not want:
        return ["the eager call launched no kernel that the profiler recorded: nothing to compare the replay with"]
    if not got:
        return ["the profiler recorded no kernel of the graph replay, so what it ran is unknown (the eager call ran "
                f"{eager.summary()})"]
    problems = []
    for name in sorted(set(want) | set(got)):
        if want.get(name, 0) != got.get(name, 0):
            problems.append(f"{shorten(name)}: {want.get(name, 0)} launch(es) eager, {got.get(name, 0)} in the replay")
    return problems


@dataclass
class TracedStep:
    """One traced forward of a case: its step, plan, trace, and what breaks the declaration."""

    index: int
    plan_text: str
    trace: KernelTrace
    declared: Optional[tuple] = None
    problems: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"step": self.index, "plan": self.plan_text, "declared": None if self.declared is None else
                [{"name": f.name, "patterns": list(f.patterns), "required": f.required} for f in self.declared],
                "problems": list(self.problems), **self.trace.as_dict()}


def trace_case(backend, case, *, device, seed: int = 0, warm: Optional[bool] = None) -> list[TracedStep]:
    """Each step of ``case`` whose plan is new (by its description) traced: the forward alone, after
    one untraced warm-up call on CUDA (JIT builds, lazy workspaces and cuDNN graph builds launch
    kernels once), checked against ``backend.expected_kernels(plan)``."""
    from pytest_attn.check.case_steps import forward_steps

    warm = str(device).startswith("cuda") if warm is None else warm
    seen, traced = set(), []

    def around(index, plan, call):
        text = plan.describe()
        if text in seen:
            return call()
        seen.add(text)
        if warm:
            call()
        result = []
        trace = record(lambda: result.append(call()), device)
        declared = as_families(expected_kernels(backend, plan))
        traced.append(TracedStep(index, text, trace, declared, check_trace(trace, declared)))
        return result[0]

    for _ in forward_steps(backend, case, device=device, seed=seed, around=around):
        pass
    return traced


def expected_kernels(backend, plan):
    """``backend.expected_kernels(plan)``, a raise named as the backend's bug (as every call into it)."""
    from pytest_attn.core import calls as guard

    return guard.call(backend, "expected_kernels", plan)


def assert_traces_match(backend, case, steps: list[TracedStep]) -> None:
    """Raise AttnCheckFailure naming the kernels when a traced step broke the declaration."""
    __tracebackhide__ = True
    from pytest_attn.core.errors import AttnCheckFailure

    bad = [s for s in steps if s.problems]
    if not bad:
        return
    first = bad[0]
    summary = f"{case.name}: step {first.index} ({first.plan_text}): {first.problems[0]}"
    details = [f"- step {s.index}: {s.plan_text}\n  " + "\n  ".join(s.problems) + "\n  kernels:\n    "
               + "\n    ".join(s.trace.lines()) for s in bad]
    raise AttnCheckFailure("\n".join([summary, f"backend {backend.name!r} launched kernels its plan does not declare "
                                               f"on case {case.name!r}:", *details]), summary=summary)


#: Turns the trace tests off where --attn-trace is not defined (an older plugin): "off".
TRACE_ENV = "PYTEST_ATTN_TRACE"


def tracing_enabled(config) -> tuple[bool, str]:
    """(whether this run traces kernels, why not): ``--attn-trace=off`` or ``$PYTEST_ATTN_TRACE=off``."""
    import os

    option = config.getoption("attn_trace", None) if config is not None else None
    if option == "off":
        return False, "kernel traces are off (--attn-trace=off)"
    if option is None and os.environ.get(TRACE_ENV, "on").strip().lower() == "off":
        return False, f"kernel traces are off (${TRACE_ENV}=off)"
    return True, ""
