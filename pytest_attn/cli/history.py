"""``pytest-attn history [.benchmarks]``: each row's median and interval across saved runs, the
step changes between consecutive runs (pytest_attn.bench.history says how a step is found), and
the rows whose last step was a regression. Exit 0 (a report; ``--fail-on-regression``: 1 when a
row regressed); 4 for a bad argument or nothing to read."""
from __future__ import annotations


def add_parser(sub) -> None:
    from pytest_attn.cli.gate import add_threshold_options
    from pytest_attn.cli.args import plot_path

    parser = sub.add_parser("history", help="each row's median and interval across saved runs; step changes; the "
                                            "rows that regressed",
                            description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("paths", nargs="*", default=[".benchmarks"], help="folders or JSON files (default .benchmarks)")
    parser.add_argument("--plot", type=plot_path, default=None, metavar="PNG", help="one panel per row")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a row regressed")
    add_threshold_options(parser)


def run(args) -> int:
    from pytest_attn.bench.gate import GateError
    from pytest_attn.bench.history import lines, load_history, plot, regressed_rows
    from pytest_attn.cli.args import UsageError

    try:
        history = load_history(args.paths)
    except GateError as exc:
        raise UsageError(str(exc)) from None
    for line in lines(history, args.threshold):
        print(line)
    regressed = regressed_rows(history, args.threshold)
    if args.plot:
        try:
            print(f"plot: {plot(history, args.plot)}")
        except OSError as exc:
            raise UsageError(f"--plot {args.plot}: {exc.strerror or exc}; give a path you can write to") from None
    runs = max(len(s.points) for s in history)
    print(f"pytest-attn history: {len(history)} rows over up to {runs} runs; regressed: "
          + (", ".join(regressed) if regressed else "none"))
    return 1 if regressed and args.fail_on_regression else 0
