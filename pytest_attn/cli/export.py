"""``pytest-attn export-cases``: the catalog (or part of it) as data, for --attn-case-file and editing."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    export = subparsers.add_parser(
        "export-cases", help="the catalog's cases as JSON (to edit, or run with --attn-case-file)",
        description="Writes catalog cases as JSON (docs/cases-as-data.md gives the format): to stdout as a list, or "
                    "to --output (.json: a list; .jsonl: one case a line). Reloaded, they equal the catalog's.")
    export.add_argument("filter", nargs="*", help="only cases with these names or tags (default: all)")
    export.add_argument("-o", "--output", default=None, metavar="PATH", help="a .json or .jsonl file to write")


def run(args) -> int:
    import json
    from pathlib import Path

    from pytest_attn.cases.catalog import select
    from pytest_attn.cases.serialize import SUFFIXES, case_to_dict, dump_cases
    from pytest_attn.cli.args import UsageError
    from pytest_attn.core.errors import AttnInputError

    try:
        chosen = select(list(args.filter))
    except AttnInputError as exc:
        raise UsageError(str(exc)) from None
    if args.output is None:
        json.dump([case_to_dict(c) for c in chosen], sys.stdout, indent=1)
        print()
        return 0
    path = Path(args.output)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--output {args.output}: end it in .json (a list) or .jsonl (one case a line)")
    try:
        dump_cases(chosen, path)
    except OSError as exc:
        raise UsageError(f"--output {args.output}: {exc.strerror or exc}; give a path you can write to") from None
    print(f"wrote {len(chosen)} case(s) to {path}")
    return 0
