"""``pytest-attn trace CASE``: the kernels each backend launched for each plan of a catalog case,
and whether they are the families the backend declares (Backend.expected_kernels)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    trace = sub.add_parser("trace", help="the kernels each backend launched on a catalog case, against what its plan "
                                         "declares",
                           description="Runs one catalog case through each backend under torch.profiler and prints, "
                                       "per plan, the kernels it launched (CUDA kernels with their streams on a GPU; "
                                       "the attention operators on CPU), after one untraced warm-up call on a GPU. A "
                                       "launch outside the kernel families the backend declares for the plan, or a "
                                       "declared family that launched nothing, is a failure. Exit 0: every backend "
                                       "ran and kept its declaration; 1: one broke, launched an undeclared kernel, or "
                                       "was named and did not run; 4: a bad argument.")
    from pytest_attn.cli.args import count_at_least, device_name, name_list

    trace.add_argument("case", help="a catalog case name (pytest-attn cases lists them)")
    trace.add_argument("--backends", type=name_list, default=["all"], metavar="NAME[,NAME...]",
                       help="default: all (those unavailable here are listed as skipped)")
    trace.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                                         "available)")
    trace.add_argument("--seed", type=count_at_least(0, "a seed >= 0"), default=0, help="input seed")
    trace.add_argument("--json", default=None, metavar="PATH", help="also write every trace, whole, as JSON here")


def command(args) -> int:
    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.differential import failure_line
    from pytest_attn.check.traces import trace_case
    from pytest_attn.cli.args import UsageError, chosen_device, failed_status, resolve_backends
    from pytest_attn.core import calls as guard
    from pytest_attn.core.errors import UnsupportedCase
    from pytest_attn.env.registry import Registry, broken_reason

    if args.case not in CATALOG:
        raise UsageError(f"unknown case {args.case!r}; pytest-attn cases lists them")
    case = CATALOG[args.case]
    backends = resolve_backends(args.backends, Registry.discover())
    device = chosen_device(args.device)
    named = set(args.backends) - {"all"}
    problems, record = [], {"case": case.name, "device": device, "backends": {}}
    print(f"kernels of {case.name} on {device} (per new plan; {'after a warm-up call' if device != 'cpu' else 'CPU: attention operators'})")
    for backend in backends:
        availability = guard.availability(backend)
        broken = broken_reason(backend, availability)
        if broken or not availability:
            reason = f"BROKE: {broken}" if broken else f"unavailable here: {availability.reason}"
            print(f"{backend.name}: skipped: {reason}")
            record["backends"][backend.name] = {"skipped": reason}
            if broken or backend.name in named:
                problems.append(f"{backend.name} did not run: {reason}")
            continue
        try:
            steps = trace_case(backend, case, device=device, seed=args.seed)
        except UnsupportedCase as exc:
            print(f"{backend.name}: cannot run the case: {'; '.join(exc.reasons)}")
            record["backends"][backend.name] = {"skipped": "; ".join(exc.reasons)}
            if backend.name in named:
                problems.append(f"{backend.name} did not run the case: {'; '.join(exc.reasons)}")
            continue
        except Exception as exc:  # guard.BackendError, an assertion: its failure alone
            print(f"{backend.name}: BROKE: {failure_line(exc)}")
            problems.append(f"{backend.name} broke: {failure_line(exc)}")
            continue
        record["backends"][backend.name] = {"steps": [s.as_dict() for s in steps]}
        for step in steps:
            verdict = ("no declaration: reported only" if step.declared is None else
                       "matches its declaration" if not step.problems else "DOES NOT MATCH its declaration")
            print(f"{backend.name}: step {step.index}: {step.plan_text}: {verdict}")
            for line in step.trace.lines():
                print(f"    {line}")
            for problem in step.problems:
                print(f"    ! {problem}")
                problems.append(f"{backend.name} step {step.index}: {problem}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
        except OSError as exc:
            raise UsageError(f"--json {args.json}: {exc.strerror or exc}; give a path you can write to") from None
    return failed_status("trace", problems)
