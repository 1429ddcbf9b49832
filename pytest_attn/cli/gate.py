"""``pytest-attn gate BASE HEAD``: the performance gate on two saved runs (pytest_attn.bench.gate).

Prints every row's ratio of medians with its bootstrap interval, threshold, regime and the spread
of each side, then one final line. Exit 0: no row regressed (or CPU timings, not gated without
--gate-cpu); 1: a row's interval lies past half its threshold and reaches it; 4: a bad argument, or runs from
different machines or versions (the line names what differs)."""
from __future__ import annotations

import argparse


def _thresholds(text: str) -> dict:
    """REGIME=FRACTION[,REGIME=FRACTION]: an argparse type."""
    from pytest_attn.bench.gate import parse_thresholds

    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("is empty; write REGIME=FRACTION, e.g. device=0.05")
    try:
        return parse_thresholds(items)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_threshold_options(parser) -> None:
    parser.add_argument("--threshold", type=_thresholds, default={}, metavar="REGIME=FRACTION[,...]",
                        help="the slowdown past which a row regresses, per regime (default device=0.05,eager=0.10); "
                             "a row's attn_gate_threshold marker overrides it")
    parser.add_argument("--gate-cpu", action="store_true",
                        help="gate CPU timings too (by default they are shown, and never fail the command)")


def add_parser(sub) -> None:
    parser = sub.add_parser("gate", help="the performance gate on two saved runs: a row regresses when the "
                                         "bootstrap interval of its median ratio lies past half its threshold and "
                                         "reaches it",
                            description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("base", help="the baseline: a saved run (--benchmark-json / --benchmark-autosave file), or a "
                                     "folder (its newest run)")
    parser.add_argument("head", help="the run to judge, the same way")
    add_threshold_options(parser)
    parser.add_argument("--regressed-only", action="store_true", help="list only the rows that regressed")


def run(args) -> int:
    from pytest_attn.bench.gate import GateError, gate, load_saved
    from pytest_attn.cli.args import UsageError

    try:
        base = load_saved(args.base)
        head = load_saved(args.head)
        result = gate(base, head, thresholds=args.threshold, gate_cpu=args.gate_cpu)
    except GateError as exc:
        raise UsageError(str(exc)) from None
    return report(result, base.path, regressed_only=args.regressed_only)


def report(result, base_label: str, *, regressed_only: bool = False, unresolved_advice: str = "") -> int:
    """Print the table and the final line; the exit status (1 when the gate failed)."""
    from pytest_attn.bench.gate import UNRESOLVED_ADVICE, summary_line, table

    for line in table(result.regressed if regressed_only else result.verdicts):
        print(line)
    for what, names in (("only in the baseline", result.only_base), ("new in this run", result.only_head),
                        ("too few samples to judge", result.too_few)):
        if names:
            print(f"not compared, {what}: {', '.join(names)}")
    print(summary_line(result, base_label, unresolved_advice or UNRESOLVED_ADVICE))
    return 1 if result.failed else 0
