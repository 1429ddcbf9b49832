"""The ``pytest-attn`` command.

  pytest-attn seed-table --a flashinfer --b torch   the seed's microbenchmark, run directly
  pytest-attn compare [.benchmarks | FILE.json ...] --plot out.png
  pytest-attn cases                                 the catalog of batch cases
  pytest-attn backends                              every registered backend: origin, availability, support
  pytest-attn differential CASE                     one case through every backend, compared with each other
  pytest-attn report RUN.json [B.json] -o OUT.html  a run's report from saved results, or two runs side by side

torch is imported only by the subcommands that run something.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest-attn", description="pytest-attn: attention backend tools")
    sub = parser.add_subparsers(dest="command", required=True)

    seed = sub.add_parser("seed-table", help="the seed's microbenchmark for several backends, in both regimes",
                          description="Batch 1, 16 heads x 80 (hidden 1280), bf16, full mask, seq_len 128..8192, "
                                      "then ragged ViT mixes; per backend, device time per call under CUDA-graph "
                                      "replay (graph) and wall time per call of uncaptured calls back to back, host "
                                      "overhead included (eager). On CPU both are wall clock.")
    seed.add_argument("--backends", default=None, metavar="NAME[,NAME...]",
                      help=f"backends to compare (default: {', '.join(DEFAULT_SEED_BACKENDS)}, those available here)")
    seed.add_argument("--a", default=None, metavar="BACKEND", help="backend A (with --b: exactly two backends)")
    seed.add_argument("--b", default=None, metavar="BACKEND", help="backend B")
    seed.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    seed.add_argument("--max-seq", type=int, default=None,
                      help="skip sizes above this (default: none on CUDA, 1024 on CPU; 0: no limit)")
    seed.add_argument("--seq-lens", default=None, help="comma list instead of 128,256,...,8192")
    seed.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    seed.add_argument("--iters", type=int, default=50, help="timed samples per regime (default 50)")
    seed.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                      help="time CUDA-graph replays when capture works (auto), always, or never (events)")
    seed.add_argument("--cold-l2", action="store_true", help="flush the L2 cache before each timed call")
    seed.add_argument("--no-mix", action="store_true", help="leave out the ragged ViT mixes")
    seed.add_argument("--seed", type=int, default=0, help="input seed")
    seed.add_argument("--plot", default=None, metavar="PNG", help="µs per token against seq_len, one panel per regime")

    compare = sub.add_parser("compare", help="crossovers and a plot from saved pytest-benchmark runs",
                             description="Reads pytest-benchmark JSON files (--benchmark-autosave writes them "
                                         "under .benchmarks/) and prints, per run, the seq_len at which one "
                                         "backend overtakes another.")
    compare.add_argument("paths", nargs="*", default=[".benchmarks"], help="JSON files or folders (default .benchmarks)")
    compare.add_argument("--plot", default=None, metavar="PNG", help="write µs per token against seq_len here")
    compare.add_argument("--require-same-device", action="store_true",
                         help="fail (exit 2) when the runs come from different GPUs, instead of comparing apart")

    cases = sub.add_parser("cases", help="list the catalog of batch cases")
    cases.add_argument("filter", nargs="*", help="only cases with these names or tags")

    diff = sub.add_parser("differential", help="one catalog case through every available backend: each against "
                                               "the reference and against each other")
    diff.add_argument("case", help="a catalog case name (pytest-attn cases lists them)")
    diff.add_argument("--backends", default="all", metavar="NAME[,NAME...]", help="default: every available one")
    diff.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    diff.add_argument("--seed", type=int, default=0, help="input seed")

    sub.add_parser("backends", help="every registered backend: where it comes from, whether it runs here, what "
                                    "it supports; and the versions of torch, CUDA, cuDNN and FlashInfer")
    from .report_render import add_report_parser

    add_report_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "seed-table":
            return seed_table_command(args)
        if args.command == "compare":
            return compare_command(args)
        if args.command == "backends":
            return backends_command(args)
        if args.command == "differential":
            return differential_command(args)
        if args.command == "report":
            from .report_render import report_command

            return report_command(args)
        return cases_command(args)
    except BrokenPipeError:  # `pytest-attn cases | head`
        return 0


# -- seed-table --------------------------------------------------------------------------------------
DEFAULT_SEED_BACKENDS = ("trtllm", "flashinfer", "torch")  # the seed's pair, and torch where it runs
REGIMES = {"graph": "device time per call, CUDA-graph replay (events where a call cannot be captured)",
           "eager": "wall time per call of uncaptured calls back to back, host overhead included"}


def seed_rows(max_seq: Optional[int], seq_lens: Optional[Sequence[int]], with_mixes: bool) -> list[tuple[str, tuple]]:
    from .bench import SEED_SEQ_LENS, VIT_MIXES

    rows = [(str(n), (n,)) for n in (seq_lens or SEED_SEQ_LENS) if not max_seq or n <= max_seq]
    if with_mixes:
        rows += [(name, lens) for name, lens in VIT_MIXES.items() if not max_seq or max(lens) <= max_seq]
    return rows


def _seed_backends(args, registry) -> list:
    """The backends to compare: --a/--b, --backends, or the defaults that are available here."""
    from . import guard

    if args.a or args.b:
        if not (args.a and args.b):
            raise ValueError("give both --a and --b, or --backends NAME,NAME,...")
        names, explicit = [args.a, args.b], True
    elif args.backends:
        names, explicit = [n.strip() for n in args.backends.split(",") if n.strip()], True
    else:
        names, explicit = list(DEFAULT_SEED_BACKENDS), False
    backends = registry.resolve(names) if explicit else [registry.get(n) for n in names if n in registry.names]
    chosen = []
    for backend in backends:
        availability = guard.availability(backend)
        if availability:
            chosen.append(backend)
        elif explicit:
            raise ValueError(f"backend {backend.name!r} is unavailable here: {availability.reason}")
    if not chosen:
        raise ValueError(f"none of {', '.join(names)} is available here; name others with --backends "
                         "(pytest-attn backends lists them)")
    return chosen


def seed_table_command(args) -> int:
    from .batch import build_batch
    from .bench import CPU_SEED_TABLE_MAX_SEQ, BenchSettings, measure_backend
    from .cases import VIT_HEAD_DIM, VIT_HEADS
    from .compare import REGIME_TITLES, draw_panels, pair_lines
    from .errors import AttnError, UnsupportedCase
    from .registry import Registry
    from .timing import GraphCaptureError

    registry = Registry.discover()
    try:
        backends = _seed_backends(args, registry)
    except (AttnError, ValueError) as exc:
        print(f"pytest-attn seed-table: {exc}", file=sys.stderr)
        return 2
    device = _device(args.device)
    if device is None:
        return 2
    max_seq = args.max_seq if args.max_seq is not None else (CPU_SEED_TABLE_MAX_SEQ if device == "cpu" else None)
    seq_lens = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else None
    settings = BenchSettings(args.warmup, args.iters, args.graph, args.cold_l2)
    names = [b.name for b in backends]
    print(f"seed microbenchmark: batch 1 (then ragged ViT mixes), {VIT_HEADS} heads x {VIT_HEAD_DIM} (hidden "
          f"{VIT_HEADS * VIT_HEAD_DIM}), bf16, full mask, {settings.warmup} warm-up + {settings.iters} timed samples "
          f"per regime, device {device}{', cold L2' if settings.cold_l2 else ''}")
    for regime, text in REGIMES.items():
        print(f"  {regime}: {text}")
    print("milliseconds per call, medians")
    cells = [f"{n} {r}" for n in names for r in REGIMES]
    width = max(10, *(len(c) for c in cells))
    header = f"{'seq_len':>20} | " + " | ".join(f"{c:>{width}}" for c in cells)
    print(header)
    print("-" * len(header))
    notes: dict[str, str] = {}
    sweep: dict[str, dict[str, dict[int, float]]] = {r: {n: {} for n in names} for r in REGIMES}  # µs/token
    for label, lens in seed_rows(max_seq, seq_lens, not args.no_mix):
        batch = build_batch(list(lens), num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                            device=device, seed=args.seed)
        row = []
        for backend in backends:
            try:
                plan, timing, _ = measure_backend(backend, batch, settings)
            except UnsupportedCase as exc:
                notes[backend.name] = "unsupported: " + "; ".join(exc.reasons)
                row += [None, None]
                continue
            except GraphCaptureError as exc:
                print(f"pytest-attn seed-table: {exc}", file=sys.stderr)
                return 1
            figures = {"graph": timing.device_median_s, "eager": timing.eager_median_s}
            row += [figures["graph"] * 1e3, figures["eager"] * 1e3]
            if len(lens) == 1:
                for regime, seconds in figures.items():
                    sweep[regime][backend.name][lens[0]] = seconds * 1e6 / lens[0]
            fallback = f" ({timing.graph_fallback})" if timing.graph_fallback and device != "cpu" else ""
            notes[backend.name] = (f"{plan.describe()}; graph regime timed by {timing.method}{fallback}; at {label}: "
                                   f"plan {timing.plan_s * 1e3:.3f} ms, host overhead "
                                   f"{timing.host_overhead_s * 1e3:.3f} ms per synchronised call")
        shown = f"{label} ({sum(lens)})" if len(lens) > 1 else label
        print(f"{shown:>20} | " + " | ".join(f"{_fmt(v):>{width}}" for v in row))
        sys.stdout.flush()
    for regime in REGIMES:
        print(f"crossovers, {regime}:")
        for line in pair_lines({n: pts for n, pts in sweep[regime].items() if pts}):
            print(f"  {line}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    if args.plot:
        panels = [(f"seed h{VIT_HEADS}xd{VIT_HEAD_DIM} bf16 full [{r}: {REGIME_TITLES[r]}]\n{device}",
                   {n: pts for n, pts in sweep[r].items() if pts}) for r in REGIMES]
        print(f"plot: {draw_panels([p for p in panels if p[1]], args.plot)}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _device(option: Optional[str]) -> Optional[str]:
    import torch

    wanted = option or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        print(f"pytest-attn: --device {wanted} but torch {torch.__version__} sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return None
    if wanted == "cuda":
        wanted = f"cuda:{torch.cuda.current_device()}"
    return wanted


# -- compare -------------------------------------------------------------------------------------------
def compare_command(args) -> int:
    from .compare import CompareError, load_runs, plot, report

    try:
        runs = load_runs(args.paths)
    except CompareError as exc:
        print(f"pytest-attn compare: {exc}", file=sys.stderr)
        return 2
    text, mixed = report(runs)
    if mixed and args.require_same_device:
        print(text.splitlines()[0], file=sys.stderr)
        print("pytest-attn compare: refusing to compare runs from different devices (--require-same-device); "
              "give only one device's runs", file=sys.stderr)
        return 2
    print(text)
    if args.plot:
        try:
            print(f"plot: {plot(runs, args.plot)}")
        except CompareError as exc:
            print(f"pytest-attn compare: {exc}", file=sys.stderr)
            return 2
    return 0


# -- backends -------------------------------------------------------------------------------------------
def backends_command(args) -> int:
    from .info import report
    from .registry import Registry

    print("\n".join(report(Registry.discover())))
    return 0


# -- differential ---------------------------------------------------------------------------------------
def differential_command(args) -> int:
    from . import guard
    from .catalog import CATALOG
    from .differential import differential
    from .errors import AttnError
    from .registry import Registry

    if args.case not in CATALOG:
        print(f"pytest-attn differential: unknown case {args.case!r}; pytest-attn cases lists them", file=sys.stderr)
        return 2
    try:
        backends = Registry.discover().resolve([args.backends])
    except AttnError as exc:
        print(f"pytest-attn differential: {exc}", file=sys.stderr)
        return 2
    backends = [b for b in backends if guard.availability(b)]
    device = _device(args.device)
    if device is None:
        return 2
    result = differential(backends, CATALOG[args.case], device=device, seed=args.seed)
    print("\n".join(result.lines()))
    return 0 if all(r.passed for r in result.ran) else 1


# -- cases -----------------------------------------------------------------------------------------------
def cases_command(args) -> int:
    from .catalog import select
    from .errors import AttnInputError

    try:
        chosen = select(list(args.filter))
    except AttnInputError as exc:
        print(f"pytest-attn cases: {exc}", file=sys.stderr)
        return 2
    for case in chosen:
        heads = f"{case.num_heads}/{case.num_kv_heads}x{case.head_dim}"
        cache = f"paged {case.kv_layout} page {case.page_size}, {case.decode_steps} decode steps" if case.cache else "no cache"
        print(f"{case.name:<22} {heads:<10} {case.dtype:<9} {case.mask:<6} seq_lens={list(case.seq_lens)} {cache}"
              f"  [{', '.join(case.tags)}]{'  ' + case.description if case.description else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
