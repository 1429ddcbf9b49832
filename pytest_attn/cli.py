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
from dataclasses import dataclass
from typing import Optional, Sequence


USAGE = 4  # a bad argument: the exit status pytest gives a bad option, with one line saying what to do


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 4 (argparse prints its usage block, exit 2)."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: {message}; {self.prog} --help lists the arguments\n")


def _count(minimum: int, what: str):
    """An argparse type: an int >= minimum, else one line saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: give {what}")
        return value

    return parse


def _lengths(text: str) -> list[int]:
    parse = _count(1, "sequence lengths >= 1, comma-separated (e.g. 128,1024)")
    values = [parse(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("is empty; give sequence lengths, comma-separated (e.g. 128,1024)")
    return values


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("is empty (an unset variable?); name backends, e.g. torch,flex, or all")
    return names


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pytest-attn", description="pytest-attn: attention backend tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    seed = sub.add_parser("seed-table", help="the seed's microbenchmark for several backends, in both regimes",
                          description="Batch 1, 16 heads x 80 (hidden 1280), bf16, full mask, seq_len 128..8192, "
                                      "then ragged ViT mixes; per backend, device time per call under CUDA-graph "
                                      "replay (graph) and wall time per call of uncaptured calls back to back, host "
                                      "overhead included (eager). On CPU both are wall clock.")
    seed.add_argument("--backends", type=_names, default=None, metavar="NAME[,NAME...]",
                      help=f"backends to compare (default: {', '.join(DEFAULT_SEED_BACKENDS)}, those available here)")
    seed.add_argument("--a", default=None, metavar="BACKEND", help="backend A (with --b: exactly two backends)")
    seed.add_argument("--b", default=None, metavar="BACKEND", help="backend B")
    seed.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    seed.add_argument("--max-seq", type=_count(0, "a length >= 1, or 0 for no limit"), default=None,
                      help="skip sizes above this (default: none on CUDA, 1024 on CPU; 0: no limit)")
    seed.add_argument("--seq-lens", type=_lengths, default=None, help="comma list instead of 128,256,...,8192")
    seed.add_argument("--warmup", type=_count(0, "0 or more warm-up calls"), default=10,
                      help="untimed calls first (default 10)")
    seed.add_argument("--iters", type=_count(1, "1 or more timed samples"), default=50,
                      help="timed samples per regime (default 50)")
    seed.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                      help="time CUDA-graph replays when capture works (auto), always, or never (events)")
    seed.add_argument("--cold-l2", action="store_true", help="flush the L2 cache before each timed call")
    seed.add_argument("--no-mix", action="store_true", help="leave out the ragged ViT mixes")
    seed.add_argument("--seed", type=_count(0, "a seed >= 0"), default=0, help="input seed")
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
    diff.add_argument("--backends", type=_names, default=["all"], metavar="NAME[,NAME...]",
                      help="default: every available one (all); a named backend that does not run the case is an "
                           "error (exit 1), with its reason")
    diff.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    diff.add_argument("--seed", type=_count(0, "a seed >= 0"), default=0, help="input seed")

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
        names, explicit = args.backends, True
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
    from .bench import CPU_SEED_TABLE_MAX_SEQ, BenchSettings
    from .cases import VIT_HEAD_DIM, VIT_HEADS
    from .errors import AttnError
    from .registry import Registry

    try:
        backends = _seed_backends(args, Registry.discover())
    except (AttnError, ValueError) as exc:
        print(f"pytest-attn seed-table: {exc}", file=sys.stderr)
        return USAGE
    device = _device(args.device)
    if device is None:
        return USAGE
    max_seq = args.max_seq if args.max_seq is not None else (CPU_SEED_TABLE_MAX_SEQ if device == "cpu" else None)
    rows = seed_rows(max_seq, args.seq_lens, not args.no_mix)
    if not rows:
        print(f"pytest-attn seed-table: no size is at most --max-seq={max_seq}; raise it, or 0 for no limit",
              file=sys.stderr)
        return USAGE
    settings = BenchSettings(args.warmup, args.iters, args.graph, args.cold_l2)
    regimes = CPU_REGIMES if device == "cpu" else REGIMES
    print(f"seed microbenchmark: batch 1 (then ragged ViT mixes), {VIT_HEADS} heads x {VIT_HEAD_DIM} (hidden "
          f"{VIT_HEADS * VIT_HEAD_DIM}), bf16, full mask, {settings.warmup} warm-up + {settings.iters} timed samples "
          f"per regime, device {device}{', cold L2' if settings.cold_l2 else ''}")
    for regime, text in regimes.items():
        print(f"  {regime}: {text}")
    table = _time_seed_rows(backends, rows, regimes, settings, device, args.seed)
    for regime in regimes:
        print(f"crossovers, {regime} (from medians; a row whose interquartile range passes "
              f"{NOISY_SPREAD:.0%} of its median is marked ~ and left out):")
        for line in _crossover_lines(table.sweep[regime], table.noisy[regime]):
            print(f"  {line}")
    for name, note in table.notes.items():
        print(f"{name}: {note}")
    if args.plot:
        from .compare import REGIME_TITLES, draw_panels

        panels = [(f"seed h{VIT_HEADS}xd{VIT_HEAD_DIM} bf16 full [{r}: {REGIME_TITLES.get(r, regimes[r])}]\n{device}",
                   {n: pts for n, pts in table.sweep[r].items() if pts}) for r in regimes]
        print(f"plot: {draw_panels([p for p in panels if p[1]], args.plot)}")
    if table.broken:
        print(f"pytest-attn seed-table: FAILED: {', '.join(table.broken)} broke (see above); the other backends' "
              "rows are complete", file=sys.stderr)
        return 1
    return 0


#: On a CPU there is no CUDA graph and no device clock: the one regime is wall time per call.
CPU_REGIMES = {"eager": "wall time per call (on a CPU both regimes are this one: no CUDA graph, no device clock)"}
NOISY_SPREAD = 0.10  # an interquartile range past this share of the median makes a row too noisy for a crossover


@dataclass
class SeedTable:
    sweep: dict  # regime -> backend -> {seq_len: µs per token}
    noisy: dict  # regime -> backend -> {seq_len, ...} rows too noisy to decide a crossover
    notes: dict
    broken: list


def _time_seed_rows(backends, rows, regimes, settings, device, seed) -> SeedTable:
    """Time every backend on every row and print the table as it goes: each cell the median and
    its interquartile range as a share of it. A backend that raises or breaks its contract gets
    its reason in the notes and n/a cells; the others go on."""
    from .batch import build_batch
    from .bench import measure_backend
    from .cases import VIT_HEAD_DIM, VIT_HEADS
    from .errors import AttnError, UnsupportedCase
    from .timing import GraphCaptureError

    names = [b.name for b in backends]
    table = SeedTable({r: {n: {} for n in names} for r in regimes}, {r: {n: set() for n in names} for r in regimes},
                      {}, [])
    cells = [f"{n} {r}" for n in names for r in regimes]
    width = max(16, *(len(c) for c in cells))
    header = f"{'seq_len':>20} | " + " | ".join(f"{c:>{width}}" for c in cells)
    print("milliseconds per call: median (interquartile range / median)")
    print(header)
    print("-" * len(header))
    for label, lens in rows:
        batch = build_batch(list(lens), num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                            device=device, seed=seed)
        row = []
        for backend in backends:
            if backend.name in table.broken:
                row += ["n/a"] * len(regimes)
                continue
            try:
                plan, timing, _ = measure_backend(backend, batch, settings)
            except UnsupportedCase as exc:
                table.notes[backend.name] = "unsupported: " + "; ".join(exc.reasons)
                row += ["n/a"] * len(regimes)
                continue
            except (AttnError, GraphCaptureError) as exc:
                table.notes[backend.name] = f"BROKE at {label}: {exc}"
                table.broken.append(backend.name)
                row += ["n/a"] * len(regimes)
                continue
            samples = {"graph": timing.device_s, "eager": timing.eager_s or timing.device_s}
            for regime in regimes:
                median, spread = _median_and_spread(samples[regime])
                row.append(f"{median * 1e3:.4f} ({spread:.0%})")
                if len(lens) == 1:
                    table.sweep[regime][backend.name][lens[0]] = median * 1e6 / lens[0]
                    if spread > NOISY_SPREAD:
                        table.noisy[regime][backend.name].add(lens[0])
            fallback = f" ({timing.graph_fallback})" if timing.graph_fallback and device != "cpu" else ""
            table.notes[backend.name] = (f"{plan.describe()}; timed by {timing.method}{fallback}; at {label}: plan "
                                         f"{timing.plan_s * 1e3:.3f} ms, host overhead "
                                         f"{timing.host_overhead_s * 1e3:.3f} ms per synchronised call")
        shown = f"{label} ({sum(lens)})" if len(lens) > 1 else label
        print(f"{shown:>20} | " + " | ".join(f"{v:>{width}}" for v in row))
        sys.stdout.flush()
    return table


def _median_and_spread(samples) -> tuple[float, float]:
    import statistics

    median = statistics.median(samples)
    if len(samples) < 4 or not median:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, (q3 - q1) / median


def _crossover_lines(sweep: dict, noisy: dict) -> list[str]:
    """compare.pair_lines over the rows quiet enough to decide (noisy rows left out, and said)."""
    from .compare import pair_lines

    quiet = {n: {k: v for k, v in pts.items() if k not in noisy[n]} for n, pts in sweep.items() if pts}
    quiet = {n: pts for n, pts in quiet.items() if pts}
    lines = (pair_lines(quiet) if len(quiet) >= 2 or len(sweep) < 2
             else ["no two backends have rows quiet enough to compare (more --iters may help)"])
    left_out = [f"{n} at {', '.join(map(str, sorted(lens)))}" for n, lens in noisy.items() if lens]
    return lines + ([f"~ too noisy to decide, left out: {'; '.join(left_out)}"] if left_out else [])


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
        return USAGE
    text, mixed = report(runs)
    if mixed and args.require_same_device:
        print(text.splitlines()[0], file=sys.stderr)
        print("pytest-attn compare: refusing to compare runs from different devices (--require-same-device); "
              "give only one device's runs", file=sys.stderr)
        return USAGE
    print(text)
    if args.plot:
        try:
            print(f"plot: {plot(runs, args.plot)}")
        except CompareError as exc:
            print(f"pytest-attn compare: {exc}", file=sys.stderr)
            return USAGE
    return 0


# -- backends -------------------------------------------------------------------------------------------
def backends_command(args) -> int:
    from .info import report
    from .registry import Registry

    print("\n".join(report(Registry.discover())))
    return 0


# -- differential ---------------------------------------------------------------------------------------
def differential_command(args) -> int:
    """Exit 0 when at least two backends ran the case and all agree with the reference; 1 when one
    fails, broke, or was named (not through 'all') and did not run it; 4 for a bad argument."""
    from . import guard
    from .catalog import CATALOG
    from .differential import BackendRun, differential
    from .errors import AttnError
    from .registry import Registry

    if args.case not in CATALOG:
        print(f"pytest-attn differential: unknown case {args.case!r}; pytest-attn cases lists them", file=sys.stderr)
        return USAGE
    try:
        backends = Registry.discover().resolve(args.backends)
    except AttnError as exc:
        print(f"pytest-attn differential: {exc}", file=sys.stderr)
        return USAGE
    device = _device(args.device)
    if device is None:
        return USAGE
    runnable = [b for b in backends if guard.availability(b)]
    result = differential(runnable, CATALOG[args.case], device=device, seed=args.seed)
    result.runs += [BackendRun(b.name, skipped=f"unavailable here: {guard.availability(b).reason}")
                    for b in backends if b not in runnable]
    print("\n".join(result.lines()))
    named = set(args.backends) - {"all"}
    missed = [r.name for r in result.runs if r.skipped and r.name in named]
    problems = result.problems() + ([f"named but did not run the case: {', '.join(missed)}"] if missed else [])
    if len(result.ran) < 2:
        problems.append(f"{len(result.ran)} backend(s) ran the case: nothing to compare")
    for problem in problems:
        print(f"pytest-attn differential: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


# -- cases -----------------------------------------------------------------------------------------------
def cases_command(args) -> int:
    from .catalog import select
    from .errors import AttnInputError

    try:
        chosen = select(list(args.filter))
    except AttnInputError as exc:
        print(f"pytest-attn cases: {exc}", file=sys.stderr)
        return USAGE
    for case in chosen:
        heads = f"{case.num_heads}/{case.num_kv_heads}x{case.head_dim}"
        cache = f"paged {case.kv_layout} page {case.page_size}, {case.decode_steps} decode steps" if case.cache else "no cache"
        print(f"{case.name:<22} {heads:<10} {case.dtype:<9} {case.mask:<6} seq_lens={list(case.seq_lens)} {cache}"
              f"  [{', '.join(case.tags)}]{'  ' + case.description if case.description else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
