"""``pytest-attn properties``: per backend and case family, whether it is deterministic and
batch-invariant on this device, measured, with the kernels it ran."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    from pytest_attn.check.properties import FAMILIES
    from pytest_attn.cli.args import count_at_least, device_name, name_list

    props = sub.add_parser("properties", help="per backend and case family: deterministic? batch-invariant? measured, "
                                              "with the kernels it ran",
                           description="Measures, for each backend and case family (" + ", ".join(FAMILIES) + "), "
                                       "whether the same batch gives the same bits twice (output and LSE) and "
                                       "whether a request's rows are the same bits in batches of other sizes and "
                                       "compositions, each planned anew; and traces the kernels of the family's "
                                       "largest batch. Exit 0: nothing broke and every declared property held; 1: a "
                                       "backend broke, a declared property (Capabilities.deterministic, "
                                       "batch_invariant) did not hold, or a named backend did not run; 4: a bad "
                                       "argument.")
    props.add_argument("--backends", type=name_list, default=["all"], metavar="NAME[,NAME...]",
                       help="default: all (those unavailable here are listed as skipped)")
    props.add_argument("--families", type=name_list, default=list(FAMILIES), metavar="NAME[,NAME...]",
                       help=f"case families (default: all: {', '.join(FAMILIES)})")
    props.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                                         "available)")
    props.add_argument("--seed", type=count_at_least(0, "a seed >= 0"), default=0, help="input seed")
    props.add_argument("--long", type=count_at_least(1, "a length >= 1"), default=None, metavar="TOKENS",
                       help="length of the long requests beside the needle (default 2048 on CUDA, 96 on CPU)")
    props.add_argument("--no-kernels", action="store_true", help="leave the kernel traces out")
    props.add_argument("--json", default=None, metavar="PATH", help="also write the measurements as JSON here")


def command(args) -> int:
    from pytest_attn.check.differential import failure_line
    from pytest_attn.check.properties import families, measure, problems, table
    from pytest_attn.cli.args import UsageError, chosen_device, failed_status, resolve_backends
    from pytest_attn.core import calls as guard
    from pytest_attn.env.registry import Registry, broken_reason

    device = chosen_device(args.device)
    long = args.long or (2048 if device.startswith("cuda") else 96)
    if long < 1:
        raise UsageError(f"--long {args.long}: give a length >= 1")
    known = families(long)
    unknown = [f for f in args.families if f not in known]
    if unknown:
        raise UsageError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; use "
                         f"{', '.join(known)}")
    backends = resolve_backends(args.backends, Registry.discover())
    named = set(args.backends) - {"all"}
    rows, failures, skipped = [], [], {}
    for backend in backends:
        availability = guard.availability(backend)
        broken = broken_reason(backend, availability)
        if broken or not availability:
            skipped[backend.name] = f"BROKE: {broken}" if broken else f"unavailable here: {availability.reason}"
            if broken or backend.name in named:
                failures.append(f"{backend.name} did not run: {skipped[backend.name]}")
            continue
        for name in args.families:
            try:
                rows.append(measure(backend, known[name], device=device, seed=args.seed,
                                    with_kernels=not args.no_kernels))
            except Exception as exc:  # guard.BackendError, an assertion: its failure alone
                failures.append(f"{backend.name} broke on {name}: {failure_line(exc)}")
                break
    print(f"determinism and batch invariance on {device} (bitwise; measured; 'declared' where the backend declares it)")
    print("\n".join(table(rows)))
    for name, reason in skipped.items():
        print(f"{name}: skipped: {reason}")
    for row in rows:
        for m in (row.deterministic, row.batch_invariant):
            for difference in m.differences[:2]:
                print(f"{row.backend} {row.family} {m.prop}: {difference}")
    ran = {r.backend for r in rows if r.deterministic.holds is not None or r.batch_invariant.holds is not None}
    failures += [f"named but ran no family: {n}" for n in sorted(named - ran) if n not in skipped]
    failures += problems(rows)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"device": device, "rows": [r.as_dict() for r in rows], "skipped": skipped}, f, indent=1)
        except OSError as exc:
            raise UsageError(f"--json {args.json}: {exc.strerror or exc}; give a path you can write to") from None
    return failed_status("properties", failures)
