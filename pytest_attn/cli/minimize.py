"""``pytest-attn minimize``: shrink a failing case to a small one that fails the same way, write it
as JSON and print the pytest command that reruns it (the search: pytest_attn.check.minimize)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

MINIMIZE_DESCRIPTION = (
    "Runs the case on the backend; if it fails, shrinks it while it still fails the same way (a wrong answer on "
    "the same kind of step, or the same exception): fewer layers, requests, decode steps, no chunking or draft "
    "tokens or layer features, shorter sequences, fewer heads, smaller pages (docs/cases-as-data.md gives the "
    "order). Prints the smallest case found, writes it as JSON and prints the pytest command that reruns it. "
    "Exit 0: minimized; 1: the case does not fail on this backend (nothing to minimize); 4: a bad argument.")


def add_parser(subparsers) -> None:
    from pytest_attn.cli.args import device_name

    parser = subparsers.add_parser("minimize", help="shrink a failing case to a minimal reproducer",
                                   description=MINIMIZE_DESCRIPTION)
    parser.add_argument("case", metavar="CASE_OR_FILE",
                        help="a catalog case name, a .json/.jsonl case file (pytest-attn export-cases writes them), or "
                             "a fuzz case's name (fuzz-SEED-I, with --fuzz)")
    parser.add_argument("--backend", required=True, metavar="NAME", help="the backend the case fails on")
    parser.add_argument("--case", dest="case_name", default=None, metavar="NAME",
                        help="which case of a file that holds several")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="where to write the minimized case (default: NAME-min.json here)")
    parser.add_argument("--device", type=device_name, default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--fuzz", default=None, metavar="ci|nightly|N",
                        help="the --attn-fuzz tier of the run a fuzz case failed in (regenerates fuzz-SEED-I)")
    parser.add_argument("--seed", type=int, default=None,
                        help="input seed (default: a fuzz case's seed, else 20261125, the plugin's); the printed "
                             "command repeats it")


FUZZ_NAME = re.compile(r"fuzz-(\d+)-(\d+)")
DEFAULT_SEED = 20261125  # the plugin's default --attn-seed (pytest_attn.plugin.options.DEFAULT_SEED)


def _fuzz_case(args, backend):
    """A fuzz case regenerated as the run that named it drew it: its seed and index from its name,
    the backend's capabilities and the --fuzz tier."""
    from pytest_attn.cases.fuzz import fuzz_case, tier
    from pytest_attn.check.minimize import runs_every_step
    from pytest_attn.cli.args import UsageError
    from pytest_attn.core.errors import AttnInputError

    seed, index = map(int, FUZZ_NAME.fullmatch(args.case).groups())
    try:
        size = tier(args.fuzz)
    except AttnInputError as exc:
        raise UsageError(str(exc).replace("--attn-fuzz", "--fuzz")) from None
    if index >= size.count:
        raise UsageError(f"{args.case}: --fuzz={args.fuzz} draws cases 0 to {size.count - 1}")
    case = fuzz_case(seed, backend.name, backend.capabilities, size, index,
                     lambda c: runs_every_step(backend, c, chosen_device(args)))
    if case is None:
        raise UsageError(f"{args.case}: no case of {backend.name}'s capabilities was drawn there")
    return case


def chosen_device(args) -> str:
    from pytest_attn.cli.args import chosen_device as resolve

    return resolve(args.device)


def _load_case(args, backend):
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.cases.serialize import cases_in_file
    from pytest_attn.cli.args import UsageError
    from pytest_attn.core.errors import AttnInputError

    if args.case in CATALOG and not Path(args.case).exists():
        return CATALOG[args.case]
    if FUZZ_NAME.fullmatch(args.case) and not Path(args.case).exists():
        if args.fuzz is None:
            raise UsageError(f"{args.case} is a fuzz case: give the --fuzz tier of its run (ci, nightly or N)")
        return _fuzz_case(args, backend)
    if not Path(args.case).is_file():
        raise UsageError(f"{args.case!r} is neither a catalog case (pytest-attn cases lists them) nor a case file")
    try:
        cases = cases_in_file(args.case)
    except AttnInputError as exc:
        raise UsageError(str(exc)) from None
    names = [c.name for c in cases]
    if args.case_name is not None:
        if args.case_name not in names:
            raise UsageError(f"{args.case} has no case {args.case_name!r}; it has {', '.join(names)}")
        return cases[names.index(args.case_name)]
    if len(cases) != 1:
        raise UsageError(f"{args.case} holds {len(cases)} cases ({', '.join(names)}); pick one with --case NAME")
    return cases[0]


def rerun_command(backend: str, path: Path, name: str, seed: int, device) -> str:
    words = ["pytest", f"--attn-backend={backend}", f"--attn-case-file={path}", f"--attn-cases={name}",
             f"--attn-seed={seed}"]
    if device is not None:
        words.append(f"--attn-device={device}")
    return " ".join(shlex.quote(w) for w in words)


def run(args) -> int:
    from pytest_attn.cases.serialize import case_to_json, dump_cases
    from pytest_attn.check.minimize import minimize
    from pytest_attn.cli.args import FAILED, UsageError, resolve_backends
    from pytest_attn.core import calls
    from pytest_attn.env.registry import Registry

    (backend,) = resolve_backends([args.backend], Registry.discover())
    availability = calls.availability(backend)
    if not availability:
        raise UsageError(f"backend {backend.name!r} is unavailable here: {availability.reason}")
    device = chosen_device(args)
    case = _load_case(args, backend)
    fuzzed = FUZZ_NAME.fullmatch(case.name)
    seed = args.seed if args.seed is not None else int(fuzzed.group(1)) if fuzzed else DEFAULT_SEED
    print(f"minimizing {case.name} ({case.describe()}) on {backend.name}, device {device}, seed {seed}")
    result = minimize(backend, case, device=device, seed=seed, log=lambda line: print(f"  still fails: {line}"))
    if result is None:
        print(f"pytest-attn minimize: {case.name} does not fail on {backend.name} (it passes, or the backend cannot "
              "run it): nothing to minimize")
        return FAILED
    small = result.case
    out = Path(args.out or f"{small.name}.json")
    try:
        dump_cases([small], out)
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}; give a path you can write to") from None
    step = f", {result.failure.step} step" if result.failure.step else ""
    print(f"fails the same way ({result.failure.kind}{step})"
          f" after {len(result.changes)} change(s), {result.runs} run(s): {result.failure.summary}")
    print(f"smallest case: {small.name}: {small.describe()}")
    print(case_to_json(small))
    print(f"written to {out}")
    print(f"rerun: {rerun_command(backend.name, out, small.name, seed, args.device)}")
    return 0
