"""``pytest-attn ab --base X --head Y``: two sides timed alternately, in rounds, and each row's
ratio HEAD/BASE with its bootstrap interval; exit 1 when a row regressed past its threshold.

A side is a backend name (required), and optionally where it runs: ``--base-python``/``--head-python``
(another environment's python, with pytest-attn installed) or ``--base-ref``/``--head-ref`` (a git
commit of this checkout, imported from a temporary worktree). Backends alone: both timed in this
process, interleaved row by row. With an environment or a commit: one subprocess per side per round,
alternating. Exit 0: no row regressed (CPU timings are shown, not gated, without --gate-cpu); 1: a
row regressed, or a side failed; 4: a bad argument."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack


def add_parser(sub) -> None:
    from pytest_attn.cli.gate import add_threshold_options
    from pytest_attn.bench.ab import DEFAULT_ITERS, DEFAULT_ROUNDS
    from pytest_attn.cli.args import count_at_least, device_name, json_path, seq_lengths

    parser = sub.add_parser("ab", help="two backends (or environments, or commits) timed in alternating rounds; "
                                       "each row's ratio with its interval; exit 1 on a regression",
                            description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--base", required=True, metavar="BACKEND", help="the baseline side's backend")
    parser.add_argument("--head", required=True, metavar="BACKEND", help="the side judged")
    for side in ("base", "head"):
        parser.add_argument(f"--{side}-python", default=None, metavar="PYTHON",
                            help=f"time the {side} side with this python (another environment with pytest-attn)")
        parser.add_argument(f"--{side}-ref", default=None, metavar="GIT_REF",
                            help=f"time the {side} side on this commit of the current git checkout")
    parser.add_argument("--seq-lens", type=seq_lengths, default=None,
                        help="ViT table rows (default 64,128 on CPU, 1024,4096 on CUDA)")
    parser.add_argument("--rounds", type=count_at_least(2, "2 or more rounds"), default=DEFAULT_ROUNDS,
                        help=f"rounds per side (default {DEFAULT_ROUNDS})")
    parser.add_argument("--iters", type=count_at_least(1, "1 or more timed samples"), default=DEFAULT_ITERS,
                        help=f"timed samples per row per round (default {DEFAULT_ITERS})")
    parser.add_argument("--warmup", type=count_at_least(0, "0 or more warm-up calls"), default=5,
                        help="untimed calls before each round's timing (default 5)")
    parser.add_argument("--graph", choices=("auto", "on", "off"), default="auto", help="CUDA graphs (CUDA only)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N")
    parser.add_argument("--json", type=json_path, default=None, metavar="PATH",
                        help="also write every verdict and every sample of both sides to PATH (a CI artifact)")
    add_threshold_options(parser)


def _subprocess_mode(args) -> bool:
    return any(getattr(args, f"{s}_{w}") for s in ("base", "head") for w in ("python", "ref"))


def run(args) -> int:
    from pytest_attn.bench.ab import (CPU_DEFAULT_SEQ_LENS, CUDA_DEFAULT_SEQ_LENS, compare_sides,
                                      measure_rounds_in_process)
    from pytest_attn.bench.measure import BenchSettings
    from pytest_attn.cli.gate import report
    from pytest_attn.cli.args import UsageError, check_device_options, chosen_device

    for side in ("base", "head"):
        if getattr(args, f"{side}_python") and getattr(args, f"{side}_ref"):
            raise UsageError(f"--{side}-python and --{side}-ref together; give one of them")
    if not _subprocess_mode(args) and args.base == args.head:
        raise UsageError(f"--base and --head both name {args.base!r} in this environment; name two backends, or give "
                         "--head-ref/--head-python to time it elsewhere")
    device = chosen_device(args.device)
    args.cold_l2 = False
    check_device_options(args, device)
    seq_lens = args.seq_lens or (CPU_DEFAULT_SEQ_LENS if device == "cpu" else CUDA_DEFAULT_SEQ_LENS)
    settings = BenchSettings(args.warmup, args.iters, args.graph, False)
    print(f"pytest-attn ab: base {_side_name(args, 'base')} vs head {_side_name(args, 'head')} on {device}; "
          f"{args.rounds} rounds x {args.iters} samples per row, sides alternating; rows: "
          + ", ".join(f"seq {n}" for n in seq_lens))
    try:
        if _subprocess_mode(args):
            base, head, machine = _rounds_in_subprocesses(args, seq_lens, device)
        else:
            from pytest_attn.bench.machine import attn_machine_info

            registry = _registry()
            backends = [_backend(registry, args.base), _backend(registry, args.head)]
            base, head = measure_rounds_in_process(*backends, seq_lens, device, settings, args.rounds,
                                                   progress=lambda line: print(f"  {line}", flush=True))
            machine = {"attn": attn_machine_info(device)}
    except UsageError:
        raise
    except Exception as exc:  # a side broke (its contract, a crash, a failed check): the command failed
        from pytest_attn.check.differential import failure_line

        print(f"pytest-attn ab: FAILED: {failure_line(exc)}", file=sys.stderr)
        return 1
    result = compare_sides(base, head, args.threshold)
    from pytest_attn.bench.machine import is_cpu_run

    if is_cpu_run(machine) and not args.gate_cpu:
        result.gated = False
        result.why_not_gated = ("CPU timings are reported, not gated (a CPU runner's noise is not a regression); "
                                "--gate-cpu gates them")
    if args.json:  # before the table: the gate's line stays the last
        _write_json(args.json, args, result, base, head, machine)
    return report(result, f"base {_side_name(args, 'base')}", unresolved_advice="more --rounds or --iters")


def _write_json(path: str, args, result, base, head, machine) -> None:
    import dataclasses
    from pathlib import Path

    from pytest_attn.cli.args import UsageError

    verdicts = [{**dataclasses.asdict(v), "outcome": v.outcome} for v in result.verdicts]
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({
            "base": _side_name(args, "base"), "head": _side_name(args, "head"), "rounds": args.rounds,
            "iters": args.iters, "machine": machine, "gated": result.gated, "failed": result.failed,
            "paired": sorted(set(base.paired) & set(head.paired)), "verdicts": verdicts,
            "samples": {"base": base.rows, "head": head.rows}}, indent=1, default=float))
    except OSError as exc:
        raise UsageError(f"--json {path}: {exc.strerror or exc}; give a path you can write to") from None
    print(f"pytest-attn ab: wrote {path}")


def _side_name(args, side: str) -> str:
    where = getattr(args, f"{side}_ref") or getattr(args, f"{side}_python")
    return f"{getattr(args, side)}@{where}" if where else getattr(args, side)


def _registry():
    from pytest_attn.env.registry import Registry

    return Registry.discover()


def _backend(registry, name: str):
    from pytest_attn.cli.args import UsageError, resolve_backends
    from pytest_attn.core import calls

    (backend,) = resolve_backends([name], registry)
    availability = calls.availability(backend)
    if not availability:
        raise UsageError(f"backend {name!r} cannot run here: {availability.reason}; pick one `pytest-attn backends` "
                         "lists as available")
    return backend


# -- sides in subprocesses ---------------------------------------------------------------------------------
def _worktree(stack: ExitStack, ref: str) -> str:
    """A temporary detached worktree of ``ref`` of the git checkout around the current folder."""
    from pytest_attn.cli.args import UsageError

    root = tempfile.mkdtemp(prefix="pytest-attn-ab-")
    path = os.path.join(root, "src")
    done = subprocess.run(["git", "worktree", "add", "--detach", path, ref], capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"--*-ref {ref}: git worktree add failed: {done.stderr.strip().splitlines()[-1:]}; give a "
                         "commit of the git checkout you run this in")
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", path], capture_output=True)
    return path


def _rounds_in_subprocesses(args, seq_lens, device):
    from pytest_attn.bench import ab_worker
    from pytest_attn.bench.ab import SideSamples
    from pytest_attn.cli.args import UsageError

    sides = {}
    with ExitStack() as stack:
        for side in ("base", "head"):
            env = dict(os.environ)
            env.pop(ab_worker.SOURCE_ENV, None)
            ref = getattr(args, f"{side}_ref")
            if ref:
                env[ab_worker.SOURCE_ENV] = _worktree(stack, ref)
            python = getattr(args, f"{side}_python") or sys.executable
            command = [python, ab_worker.__file__, "--backend", getattr(args, side), "--seq-lens",
                       ",".join(map(str, seq_lens)), "--device", device, "--warmup", str(args.warmup),
                       "--iters", str(args.iters), "--graph", args.graph]
            sides[side] = (command, env, SideSamples())
        machines = {}
        for index in range(args.rounds):
            for side in (("base", "head") if index % 2 == 0 else ("head", "base")):
                command, env, samples = sides[side]
                found = _one_round(command, env, side)
                if side not in machines:  # say once where each side's code came from
                    print(f"  {side}: {command[0]} with pytest_attn from {found.get('source', '?')}", flush=True)
                machines[side] = found.get("machine") or {}
                for label, per_regime in found["rows"].items():
                    samples.add(label, per_regime)
            print(f"  round {index + 1}/{args.rounds} done", flush=True)
    from pytest_attn.bench.machine import differences

    differ = differences(machines["base"], machines["head"])
    if differ:
        raise UsageError("not compared: the two sides differ in " + "; ".join(differ)
                         + "; compare sides on the same machine and library versions")
    return sides["base"][2], sides["head"][2], machines["head"]


class SideFailed(Exception):
    """A side's subprocess failed: the command failed (exit 1), not a usage error."""


def _one_round(command, env, side: str) -> dict:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SideFailed(f"the {side} side failed (exit {done.returncode}): {tail}")
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise SideFailed(f"the {side} side printed no result: {lines[-1][:200]}") from None
