"""The ``pytest-attn`` command.

  pytest-attn seed-table --a flashinfer --b torch   the seed's microbenchmark, run directly
  pytest-attn compare [.benchmarks | FILE.json ...] --plot out.png
  pytest-attn cases                                 the catalog of batch cases
  pytest-attn backends                              every registered backend: origin, availability, support

torch is imported only by the subcommands that run something.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest-attn", description="pytest-attn: attention backend tools")
    sub = parser.add_subparsers(dest="command", required=True)

    seed = sub.add_parser("seed-table", help="the seed's microbenchmark for two backends, as a table",
                          description="Batch 1, 16 heads x 80 (hidden 1280), bf16, full mask, seq_len 128..8192, "
                                      "then ragged ViT mixes; device time per call (CUDA graph replay or events "
                                      "on GPU, wall clock on CPU).")
    seed.add_argument("--a", required=True, metavar="BACKEND", help="backend A (a registered name)")
    seed.add_argument("--b", required=True, metavar="BACKEND", help="backend B (a registered name)")
    seed.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    seed.add_argument("--max-seq", type=int, default=None,
                      help="skip sizes above this (default: none on CUDA, 1024 on CPU; 0: no limit)")
    seed.add_argument("--seq-lens", default=None, help="comma list instead of 128,256,...,8192")
    seed.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    seed.add_argument("--iters", type=int, default=50, help="timed calls (default 50)")
    seed.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                      help="time CUDA-graph replays when capture works (auto), always, or never")
    seed.add_argument("--cold-l2", action="store_true", help="flush the L2 cache before each timed call")
    seed.add_argument("--no-mix", action="store_true", help="leave out the ragged ViT mixes")
    seed.add_argument("--seed", type=int, default=0, help="input seed")

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

    sub.add_parser("backends", help="every registered backend: where it comes from, whether it runs here, what "
                                    "it supports; and the versions of torch, CUDA, cuDNN and FlashInfer")
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
        return cases_command(args)
    except BrokenPipeError:  # `pytest-attn cases | head`
        return 0


# -- seed-table --------------------------------------------------------------------------------------
def seed_rows(max_seq: Optional[int], seq_lens: Optional[Sequence[int]], with_mixes: bool) -> list[tuple[str, tuple]]:
    from .bench import SEED_SEQ_LENS, VIT_MIXES

    rows = [(str(n), (n,)) for n in (seq_lens or SEED_SEQ_LENS) if not max_seq or n <= max_seq]
    if with_mixes:
        rows += [(name, lens) for name, lens in VIT_MIXES.items() if not max_seq or max(lens) <= max_seq]
    return rows


def seed_table_command(args) -> int:
    from .bench import CPU_SEED_TABLE_MAX_SEQ, BenchSettings, measure_backend
    from .cases import VIT_HEAD_DIM, VIT_HEADS
    from .errors import AttnError, UnsupportedCase
    from .batch import build_batch
    from .registry import Registry
    from .timing import GraphCaptureError

    registry = Registry.discover()
    try:
        backends = [registry.get(args.a), registry.get(args.b)]
    except AttnError as exc:
        print(f"pytest-attn seed-table: {exc}", file=sys.stderr)
        return 2
    device = _device(args.device)
    if device is None:
        return 2
    for backend in backends:
        availability = backend.available()
        if not availability:
            print(f"pytest-attn seed-table: backend {backend.name!r} is unavailable here: {availability.reason}",
                  file=sys.stderr)
            return 2
    max_seq = args.max_seq if args.max_seq is not None else (CPU_SEED_TABLE_MAX_SEQ if device == "cpu" else None)
    seq_lens = [int(s) for s in args.seq_lens.split(",")] if args.seq_lens else None
    settings = BenchSettings(args.warmup, args.iters, args.graph, args.cold_l2)
    a, b = (bk.name for bk in backends)
    print(f"seed microbenchmark: batch 1 (then ragged ViT mixes), {VIT_HEADS} heads x {VIT_HEAD_DIM} (hidden "
          f"{VIT_HEADS * VIT_HEAD_DIM}), bf16, full mask, {settings.warmup} warm-up + {settings.iters} timed calls, "
          f"device {device}{', cold L2' if settings.cold_l2 else ''}")
    print(f"A = {a}, B = {b}; times are medians of device time per call")
    header = f"{'seq_len':>20} | {'A_ms':>9} | {'B_ms':>9} | {'A_µs/tok':>9} | {'B_µs/tok':>9} | {'ratio A/B':>9}"
    print(header)
    print("-" * len(header))
    notes: dict[str, str] = {}
    for label, lens in seed_rows(max_seq, seq_lens, not args.no_mix):
        batch = build_batch(list(lens), num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                            device=device, seed=args.seed)
        ms = []
        for backend in backends:
            try:
                plan, timing, _ = measure_backend(backend, batch, settings)
            except UnsupportedCase as exc:
                notes[backend.name] = "unsupported: " + "; ".join(exc.reasons)
                ms.append(None)
                continue
            except GraphCaptureError as exc:
                print(f"pytest-attn seed-table: {exc}", file=sys.stderr)
                return 1
            ms.append(timing.device_median_s * 1e3)
            fallback = f" ({timing.graph_fallback})" if timing.graph_fallback and device != "cpu" else ""
            notes[backend.name] = (f"{plan.describe()}; timed by {timing.method}{fallback}; at {label}: plan "
                                   f"{timing.plan_s * 1e3:.3f} ms, host overhead {timing.host_overhead_s * 1e3:.3f} ms/call")
        if len(lens) > 1:
            label = f"{label} ({sum(lens)})"
        tokens = sum(lens)
        cells = [_fmt(m) for m in ms] + [_fmt(m * 1e3 / tokens if m is not None else None) for m in ms]
        ratio = _fmt(ms[0] / ms[1]) if None not in ms and ms[1] > 0 else "n/a"
        print(f"{label:>20} | {cells[0]:>9} | {cells[1]:>9} | {cells[2]:>9} | {cells[3]:>9} | {ratio:>9}")
        sys.stdout.flush()
    for name, note in notes.items():
        print(f"{name}: {note}")
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


# -- cases -----------------------------------------------------------------------------------------------
def cases_command(args) -> int:
    from .cases import select
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
