"""The ``pytest-attn`` command.

  pytest-attn vit-table --a flashinfer --b torch    the ViT table (the founding workload), run directly
                                                    (seed-table: its old name, deprecated, for one release)
  pytest-attn compare [.benchmarks | FILE.json ...] --plot out.png
  pytest-attn gate BASE.json HEAD.json              the performance gate: rows whose slowdown is past the threshold
  pytest-attn ab --base X --head Y                  two backends (or environments, commits) timed in alternation
  pytest-attn history [.benchmarks]                 each row's median and interval across saved runs, step changes
  pytest-attn cases                                 the catalog of batch cases
  pytest-attn backends                              every registered backend: origin, availability, support
  pytest-attn differential CASE                     one case through every backend, compared with each other
  pytest-attn report RUN.json [B.json] -o OUT.html  a run's report from saved results, or two runs side by side
  pytest-attn trace CASE --backends a,b             the kernels each backend launched, against its declaration
  pytest-attn properties [--json PATH]              deterministic? batch-invariant? per backend and case family
  pytest-attn export-cases [NAME|TAG ...] [-o F]    the catalog as JSON (cases as data: --attn-case-file)
  pytest-attn minimize CASE_OR_FILE --backend NAME  shrink a failing case to a minimal reproducer

Exit status: 0 when all is well; 1 when a command ran and found a failure (a backend broke or
disagrees, or one named on the command line did not run); 4 for a bad argument, said in one line on
stderr (``pytest-attn COMMAND: what was wrong; what to do``), never a traceback. torch is imported
only by the subcommands that run something.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from pytest_attn.cli.args import (USAGE, UsageError, check_device_options, count_at_least, chosen_device,
                                   device_name, failed_status, seq_lengths, name_list, plot_path, resolve_backends, one_line)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 4 (argparse prints its usage block, exit 2)."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: {one_line(message)}; {self.prog} --help lists the arguments\n")


def _add_vit_table_parser(sub, name: str, help_text: str) -> None:
    seed = sub.add_parser(name, help=help_text,
                          description="Batch 1, 16 heads x 80 (hidden 1280), bf16, full mask, seq_len 128..8192, "
                                      "then ragged ViT mixes; per backend, device time per call under CUDA-graph "
                                      "replay (device) and wall time per call of uncaptured calls back to back, host "
                                      "overhead included (eager). On CPU there is one column per backend, wall "
                                      "clock: both regimes are that one measurement there. Each cell is the median "
                                      "with its interquartile range; a seq_len where two medians lie within their "
                                      "spread is too close to call and makes no crossover. Exit 1 when a backend "
                                      "broke, or a named one (--backends, --a/--b) did not run; the defaults that "
                                      "are unavailable here are listed as skipped.")
    seed.add_argument("--backends", type=name_list, default=None, metavar="NAME[,NAME...]",
                      help=f"backends to compare (default: {', '.join(DEFAULT_SEED_BACKENDS)}, those available here)")
    seed.add_argument("--a", default=None, metavar="BACKEND", help="backend A (with --b: exactly two backends)")
    seed.add_argument("--b", default=None, metavar="BACKEND", help="backend B")
    seed.add_argument("--device", type=device_name, default=None,
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    seed.add_argument("--max-seq", type=count_at_least(0, "a length >= 1, or 0 for no limit"), default=None,
                      help="skip sizes above this (default: none on CUDA, 1024 on CPU; 0: no limit)")
    seed.add_argument("--seq-lens", type=seq_lengths, default=None, help="comma list instead of 128,256,...,8192")
    seed.add_argument("--warmup", type=count_at_least(0, "0 or more warm-up calls"), default=10,
                      help="untimed calls first (default 10)")
    seed.add_argument("--iters", type=count_at_least(1, "1 or more timed samples"), default=50,
                      help="timed samples per regime (default 50)")
    seed.add_argument("--graph", choices=("auto", "on", "off"), default="auto",
                      help="time CUDA-graph replays when capture works (auto), always, or never (events); CUDA only")
    seed.add_argument("--cold-l2", action="store_true", help="flush the L2 cache before each timed call (CUDA only)")
    seed.add_argument("--no-mix", action="store_true", help="leave out the ragged ViT mixes")
    seed.add_argument("--seed", type=count_at_least(0, "a seed >= 0"), default=0, help="random seed of the inputs")
    seed.add_argument("--plot", type=plot_path, default=None, metavar="PNG",
                      help="µs per token against seq_len, one panel per regime (.png, .svg or .pdf)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pytest-attn", description="pytest-attn: attention backend tools. A bad argument is one "
                                                     "line on stderr and exit 4.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_vit_table_parser(sub, "vit-table", "the ViT table (the founding workload) for several backends, in both "
                                            "regimes")
    _add_vit_table_parser(sub, "seed-table", "deprecated name of vit-table (removed in the next release)")

    compare = sub.add_parser("compare", help="crossovers and a plot from saved pytest-benchmark runs",
                             description="Reads pytest-benchmark JSON files (--benchmark-autosave writes them "
                                         "under .benchmarks/) and prints, per run, the seq_len at which one "
                                         "backend overtakes another (a seq_len where the medians lie within their "
                                         "interquartile ranges is too close to call).")
    compare.add_argument("paths", nargs="*", default=[".benchmarks"], help="JSON files or folders (default .benchmarks)")
    compare.add_argument("--plot", type=plot_path, default=None, metavar="PNG",
                         help="write µs per token against seq_len here (.png, .svg or .pdf)")
    compare.add_argument("--require-same-device", action="store_true",
                         help="fail (exit 4) when the runs come from different GPUs, instead of comparing apart")

    cases = sub.add_parser("cases", help="list the catalog of batch cases")
    cases.add_argument("filter", nargs="*", help="only cases with these names or tags")

    diff = sub.add_parser("differential", help="one catalog case through every available backend: each against "
                                               "the reference and against each other",
                          description="Runs one catalog case through each backend, compares each output with the "
                                      "reference and every pair of outputs with each other (an output with NaN or "
                                      "Inf agrees with nothing). Every backend gets a row: its errors, skipped with "
                                      "the reason (unavailable here, or cannot run the case), or BROKE with what "
                                      "broke. Exit 0: at least two backends ran, all agree with the reference, none "
                                      "broke, and every backend named in --backends ran. Exit 1 otherwise; the "
                                      "backends that 'all' (the default) brings in and that are unavailable or "
                                      "cannot run the case are only listed. Exit 4: a bad argument.")
    diff.add_argument("case", help="a catalog case name (pytest-attn cases lists them)")
    diff.add_argument("--backends", type=name_list, default=["all"], metavar="NAME[,NAME...]",
                      help="default: all (every registered backend; those unavailable here are listed as skipped); "
                           "a backend named here that does not run the case fails the command (exit 1), with its "
                           "reason")
    diff.add_argument("--device", type=device_name, default=None,
                      help="cpu, cuda or cuda:N (default: cuda when available)")
    diff.add_argument("--seed", type=count_at_least(0, "a seed >= 0"), default=0, help="input seed")

    sub.add_parser("backends", help="every registered backend: where it comes from, whether it runs here, what "
                                    "it supports; and the versions of torch, CUDA, cuDNN and FlashInfer",
                   description="Lists every registered backend, a broken one too (with what broke).")
    from pytest_attn.report.render import add_report_parser

    add_report_parser(sub)
    from pytest_attn.cli import properties, trace

    trace.add_parser(sub)
    properties.add_parser(sub)
    for command in extra_commands().values():
        command.add_parser(sub)
    return parser


def extra_commands() -> dict:
    """Subcommands that live in their own modules (each: add_parser(sub), run(args)); they import
    only argparse and this module at import time."""
    from pytest_attn.cli import ab, export, gate, history, minimize

    return {"gate": gate, "ab": ab, "history": history, "export-cases": export, "minimize": minimize}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"pytest-attn {args.command}: {one_line(str(exc))}", file=sys.stderr)
        return USAGE
    except BrokenPipeError:  # `pytest-attn cases | head`
        return 0


def _run(args) -> int:
    if args.command in ("vit-table", "seed-table"):
        code = vit_table_command(args)
        if args.command == "seed-table":  # once it ran: a bad argument stays one line and prints nothing else
            print(DEPRECATED_SEED_TABLE)
        return code
    if args.command in extra_commands():
        return extra_commands()[args.command].run(args)
    if args.command == "compare":
        return compare_command(args)
    if args.command == "backends":
        return backends_command(args)
    if args.command == "differential":
        return differential_command(args)
    if args.command in ("trace", "properties"):
        from pytest_attn.cli import properties, trace

        return {"trace": trace, "properties": properties}[args.command].command(args)
    if args.command == "report":
        from pytest_attn.report.render import report_command

        return report_command(args)
    return cases_command(args)


# -- vit-table --------------------------------------------------------------------------------------
DEPRECATED_SEED_TABLE = ("pytest-attn: `seed-table` is deprecated and will be removed in the next release; use "
                         "`vit-table`")
DEFAULT_SEED_BACKENDS = ("trtllm", "flashinfer", "torch")  # the founding pair, and torch where it runs
REGIMES = {"device": "device time per call, CUDA-graph replay (events where a call cannot be captured)",
           "eager": "wall time per call of uncaptured calls back to back, host overhead included"}
#: On a CPU there is no CUDA graph and no device clock: the one measurement is wall time per call.
CPU_REGIMES = {"wall": "wall time per call (a CPU has no CUDA graph and no device clock: both regimes are this "
                       "one measurement)"}
MIN_SAMPLES_FOR_SPREAD = 4  # fewer timed samples give no interquartile range worth the name


def seed_rows(max_seq: Optional[int], seq_lens: Optional[Sequence[int]], with_mixes: bool) -> list[tuple[str, tuple]]:
    from pytest_attn.bench.measure import VIT_MIXES, VIT_TABLE_SEQ_LENS

    rows = [(str(n), (n,)) for n in (seq_lens or VIT_TABLE_SEQ_LENS) if not max_seq or n <= max_seq]
    if with_mixes:
        rows += [(name, lens) for name, lens in VIT_MIXES.items() if not max_seq or max(lens) <= max_seq]
    return rows


@dataclass
class SeedBackends:
    chosen: list  # the backends to time
    left_out: dict  # name -> why it is not timed (unavailable here, or broken)
    named: set  # names given one by one (--a/--b, --backends without 'all'): each must run


def _seed_backend_names(args) -> tuple[list[str], bool]:
    """(names, whether the user gave them) from --a/--b, --backends, or the defaults."""
    if args.backends and (args.a or args.b):
        raise UsageError("--a/--b and --backends together; give one or the other")
    if args.a or args.b:
        if not (args.a and args.b):
            raise UsageError(f"--{'a' if args.a else 'b'} alone; give both --a and --b, or --backends NAME,NAME,...")
        if args.a == args.b:
            raise UsageError(f"--a and --b both name {args.a!r}; name two different backends")
        return [args.a, args.b], True
    if args.backends:
        return args.backends, True
    return list(DEFAULT_SEED_BACKENDS), False


def _seed_backends(args, registry) -> SeedBackends:
    """The backends to time; those that are unavailable here or broken, with the reason."""
    from pytest_attn.core import calls as guard
    from pytest_attn.env.registry import broken_reason

    names, given = _seed_backend_names(args)
    backends = resolve_backends(names, registry) if given else [registry.get(n) for n in names if n in registry.names]
    found = SeedBackends([], {}, {n for n in names if n != "all"} if given else set())
    for backend in backends:
        availability = guard.availability(backend)
        broken = broken_reason(backend, availability)
        if broken:
            found.left_out[backend.name] = f"BROKE: {broken}"
        elif not availability:
            found.left_out[backend.name] = f"unavailable here: {availability.reason}"
        else:
            found.chosen.append(backend)
    return found


def vit_table_command(args) -> int:
    """Exit 0 when every backend timed broke nothing and every named one ran; 1 otherwise."""
    from pytest_attn.bench.measure import CPU_VIT_TABLE_MAX_SEQ, BenchSettings
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS
    from pytest_attn.env.registry import Registry

    backends = _seed_backends(args, Registry.discover())
    device = chosen_device(args.device)
    check_device_options(args, device)
    max_seq = args.max_seq if args.max_seq is not None else (CPU_VIT_TABLE_MAX_SEQ if device == "cpu" else None)
    rows = seed_rows(max_seq, args.seq_lens, not args.no_mix)
    if not rows:
        raise UsageError(f"no size is at most --max-seq={max_seq}; raise it, or 0 for no limit")
    settings = BenchSettings(args.warmup, args.iters, args.graph, args.cold_l2)
    regimes = CPU_REGIMES if device == "cpu" else REGIMES
    print(f"ViT table: batch 1 (then ragged ViT mixes), {VIT_HEADS} heads x {VIT_HEAD_DIM} (hidden "
          f"{VIT_HEADS * VIT_HEAD_DIM}), bf16, full mask, {settings.warmup} warm-up + {settings.iters} timed samples "
          f"per regime, device {device}{', cold L2' if settings.cold_l2 else ''}")
    for regime, text in regimes.items():
        print(f"  {regime}: {text}")
    for name, reason in backends.left_out.items():
        print(f"{name}: {'did not run' if name in backends.named else 'skipped'}: {reason}")
    table = _time_seed_rows(backends.chosen, rows, regimes, settings, device, args.seed)
    for regime in regimes:
        print(f"crossovers, {regime} (from medians; a seq_len where two medians lie within their interquartile "
              "ranges is too close to call):")
        for line in _crossover_lines(table.sweep[regime], table.spread[regime]):
            print(f"  {line}")
    for name, notes in table.notes.items():
        for note in notes:
            print(f"{name}: {note}")
    if args.plot:
        _plot_seed_table(table, regimes, device, args.plot)
    return failed_status(args.command, _seed_problems(backends, table))


def _seed_problems(backends: SeedBackends, table: "SeedTable") -> list[str]:
    """A backend that broke (named or not); a named one that timed no row; nothing timed at all."""
    problems = [f"{name} broke: {reason.removeprefix('BROKE: ')}" for name, reason in backends.left_out.items()
                if reason.startswith("BROKE: ")]
    problems += [f"{name} broke {reason}" for name, reason in table.broken.items()]
    missed = [n for n in sorted(backends.named) if n not in table.timed and n not in table.broken
              and not backends.left_out.get(n, "").startswith("BROKE: ")]
    if missed:
        problems.append(f"named but timed no row: {', '.join(missed)} (the reasons are above)")
    if not table.timed:
        problems.append("no backend was timed: name one that runs here (pytest-attn backends lists them)")
    return problems


def _plot_seed_table(table: "SeedTable", regimes: dict, device: str, path: str) -> None:
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS
    from pytest_attn.bench.compare import REGIME_TITLES, draw_panels

    panels = [(f"vit-table h{VIT_HEADS}xd{VIT_HEAD_DIM} bf16 full [{r}: {REGIME_TITLES.get(r, regimes[r])}]\n{device}",
               {n: pts for n, pts in table.sweep[r].items() if pts}) for r in regimes]
    panels = [p for p in panels if p[1]]
    if not panels:
        print("plot: not drawn, no backend timed a single sequence")
        return
    try:
        print(f"plot: {draw_panels(panels, path)}")
    except OSError as exc:
        raise UsageError(f"--plot {path}: {exc.strerror or exc}; give a path you can write to") from None


@dataclass
class SeedTable:
    sweep: dict  # regime -> backend -> {seq_len: µs per token}
    spread: dict  # regime -> backend -> {seq_len: interquartile range / median}, where there are enough samples
    notes: dict  # backend -> lines: its plan and timer, the rows it cannot run and why, what broke
    broken: dict  # backend -> "at ROW: what broke"
    timed: set  # backends that timed at least one row


def _time_seed_rows(backends, rows, regimes, settings, device, seed) -> SeedTable:
    """Time every backend on every row and print the table as it goes: each cell the median and
    its interquartile range as a share of it. A backend that cannot run a row gets n/a there and its
    reason in the notes; one that raises or breaks its contract gets n/a from there on and what
    broke in the notes; the others go on."""
    from pytest_attn.check.batch import build_batch
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS

    names = [b.name for b in backends]
    table = SeedTable({r: {n: {} for n in names} for r in regimes}, {r: {n: {} for n in names} for r in regimes},
                      {n: [] for n in names}, {}, set())
    if not names:
        print("no backend to time (the reasons are above)")
        return table
    unsupported: dict = {n: {} for n in names}  # backend -> reasons -> [row labels]
    last_timed: dict = {}
    cells = [f"{n} {r}" for n in names for r in regimes]
    width = max([16] + [len(c) for c in cells])
    header = f"{'seq_len':>20} | " + " | ".join(f"{c:>{width}}" for c in cells)
    print("milliseconds per call: median (interquartile range / median; n<4: too few samples for one)")
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
            row += _time_one(backend, batch, label, lens, regimes, settings, table, unsupported, last_timed)
        shown = f"{label} ({sum(lens)})" if len(lens) > 1 else label
        print(f"{shown:>20} | " + " | ".join(f"{v:>{width}}" for v in row))
        sys.stdout.flush()
    for name in names:
        if name in last_timed:
            table.notes[name].append(last_timed[name])
        table.notes[name] += [f"cannot run {', '.join(labels)}: {reasons}"
                              for reasons, labels in unsupported[name].items()]
        if name in table.broken:
            table.notes[name].append(f"BROKE {table.broken[name]}")
    return table


def _time_one(backend, batch, label, lens, regimes, settings, table: SeedTable, unsupported, last_timed) -> list[str]:
    """One backend's cells on one row (n/a where it cannot run it or breaks), recorded in ``table``."""
    from pytest_attn.bench.measure import measure_backend
    from pytest_attn.check.differential import failure_line
    from pytest_attn.core.errors import UnsupportedCase

    try:
        plan, timing, _ = measure_backend(backend, batch, settings)
    except UnsupportedCase as exc:
        unsupported[backend.name].setdefault("; ".join(exc.reasons), []).append(label)
        return ["n/a"] * len(regimes)
    except Exception as exc:  # guard.BackendError, GraphCaptureError (--graph on), an assertion: its failure alone
        table.broken[backend.name] = f"at {label}: {failure_line(exc)}"
        return ["n/a"] * len(regimes)
    table.timed.add(backend.name)
    samples = {"device": timing.device_s, "eager": timing.samples("eager"), "wall": timing.device_s}
    cells = []
    for regime in regimes:
        median, spread = _median_and_spread(samples[regime])
        cells.append(f"{median * 1e3:.4f} ({'n<4' if spread is None else f'{spread:.0%}'})")
        if len(lens) == 1:
            table.sweep[regime][backend.name][lens[0]] = median * 1e6 / lens[0]
            if spread is not None:
                table.spread[regime][backend.name][lens[0]] = spread
    fallback = f" ({timing.graph_fallback})" if timing.graph_fallback and batch.device != "cpu" else ""
    last_timed[backend.name] = (f"{plan.describe()}; timed by {timing.method}{fallback}; at {label}: plan "
                                f"{timing.plan_s * 1e3:.3f} ms, host overhead {timing.host_overhead_s * 1e3:.3f} ms "
                                f"per synchronised call; {_roofline_text(batch, timing.device_median_s)}")
    return cells


def _roofline_text(batch, seconds: float) -> str:
    """Achieved TFLOP/s and GB/s at ``seconds`` per call, with their share of the peaks measured here."""
    from pytest_attn.bench.roofline import achieved, attention_bytes, attention_flops
    from pytest_attn.bench.timing import copy_peak_gbps, matmul_peak_tflops

    r = achieved(attention_flops(batch.metadata, batch.layer), attention_bytes(batch.metadata, batch.layer), seconds,
                 matmul_peak_tflops(batch.device), copy_peak_gbps(batch.device))
    return (f"{r['tflops']:.3g} TFLOP/s ({r['pct_of_matmul_peak']:.0f}% of the measured matmul peak), "
            f"{r['gbps']:.3g} GB/s ({r['pct_of_copy_peak']:.0f}% of the measured copy bandwidth)")


def _median_and_spread(samples) -> tuple[float, Optional[float]]:
    """(median, interquartile range / median); the spread is None with too few samples for one."""
    import statistics

    median = statistics.median(samples)
    if len(samples) < MIN_SAMPLES_FOR_SPREAD or median <= 0:
        return median, None
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, (q3 - q1) / median


def _crossover_lines(sweep: dict, spread: dict) -> list[str]:
    """compare.pair_lines over the backends that timed a single sequence, with their spread."""
    from pytest_attn.bench.compare import pair_lines

    timed = {n: pts for n, pts in sweep.items() if pts}
    if not timed:
        return ["no backend timed a single sequence: nothing to compare"]
    return pair_lines(timed, {n: spread[n] for n in timed})


# -- compare -------------------------------------------------------------------------------------------
def compare_command(args) -> int:
    from pytest_attn.bench.compare import CompareError, by_machine, load_runs, plot, report

    try:
        runs = load_runs(args.paths)
    except CompareError as exc:
        raise UsageError(str(exc)) from None
    text, mixed = report(runs)
    if mixed and args.require_same_device:
        raise UsageError(f"refusing to compare runs from different devices ({'; '.join(by_machine(runs))}) with "
                         "--require-same-device; give only one device's runs")
    print(text)
    if args.plot:
        try:
            print(f"plot: {plot(runs, args.plot)}")
        except CompareError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"--plot {args.plot}: {exc.strerror or exc}; give a path you can write to") from None
    return 0


# -- backends -------------------------------------------------------------------------------------------
def backends_command(args) -> int:
    """Every registered backend, a broken one with what broke: exit 0 (a listing, not a test)."""
    from pytest_attn.cli.backends_info import report
    from pytest_attn.env.registry import Registry

    print("\n".join(report(Registry.discover())))
    return 0


# -- differential ---------------------------------------------------------------------------------------
def differential_command(args) -> int:
    """Exit 0 when at least two backends ran the case, all agree with the reference, none broke and
    every named one ran; 1 otherwise (each reason one line on stderr); 4 for a bad argument."""
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.differential import differential
    from pytest_attn.env.registry import Registry

    if args.case not in CATALOG:
        raise UsageError(f"unknown case {args.case!r}; pytest-attn cases lists them")
    backends = resolve_backends(args.backends, Registry.discover())
    device = chosen_device(args.device)
    result = differential(backends, CATALOG[args.case], device=device, seed=args.seed)
    print("\n".join(result.lines()))
    return failed_status("differential", _differential_problems(result, set(args.backends) - {"all"}))


def _differential_problems(result, named: set) -> list[str]:
    """What makes a differential fail: a backend that broke or disagrees, a named one that did not
    run (its reason is in the table), fewer than two backends to compare."""
    problems = result.problems()
    missed = [r.name for r in result.skipped if r.name in named]
    if missed:
        problems.append(f"named but did not run the case: {', '.join(missed)} (the reasons are above)")
    if len(result.ran) < 2:
        problems.append(f"{len(result.ran)} backend(s) ran the case: nothing to compare; name two or more that "
                        "run it here")
    return problems


# -- cases -----------------------------------------------------------------------------------------------
def cases_command(args) -> int:
    from pytest_attn.cases.catalog import select
    from pytest_attn.core.errors import AttnInputError

    try:
        chosen = select(list(args.filter))
    except AttnInputError as exc:
        raise UsageError(str(exc)) from None
    for case in chosen:
        spec = case.layer_spec
        heads = f"{spec.num_heads}/{spec.num_kv_heads}x{spec.head_dim}"
        cache = f"paged {case.kv_layout} page {case.page_size}, {case.decode_steps} decode steps" if case.cache else "no cache"
        print(f"{case.name:<22} {heads:<10} {spec.dtype:<9} {spec.mask:<6} seq_lens={list(case.seq_lens)} {cache}"
              f"  [{', '.join(case.tags)}]{'  ' + case.description if case.description else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
