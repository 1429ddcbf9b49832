"""pytest-attn's command-line options: their definitions, which of them a run gave, and the check
of every value at configure time (a one-line usage error that names the fix, never a traceback
mid-run, never a green run that tested nothing)."""
from __future__ import annotations

import os
from typing import Optional

import pytest

SEED_ENV = "PYTEST_ATTN_SEED"
SUITE_MODES = ("auto", "on", "off")
BENCH_METRICS = ("device", "eager")

#: dest -> default of every option add_options() defines; a run that changes none of them has not
#: asked for pytest-attn.
DEFAULTS: dict = {}
#: dest -> the parser of an option's text (numbers, choices): argparse takes every value as text,
#: and check() parses it, so that a bad one is our one-line usage error, not argparse's usage block.
PARSERS: dict = {}


def _integer(text: str, flag: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise _usage(f"{flag}={text!r} is not an integer") from None


def _choice(*choices: str):
    def parse(text: str, flag: str) -> str:
        if text not in choices:
            raise _usage(f"{flag}={text!r}: use {', '.join(choices[:-1])} or {choices[-1]}")
        return text

    parse.choices = choices
    return parse


def _fuzz_tier(text: str, flag: str) -> str:
    """ci, nightly or a count >= 1, as given (the rerun command repeats it)."""
    from pytest_attn.cases.fuzz import tier
    from pytest_attn.core.errors import AttnInputError

    try:
        tier(text)
    except AttnInputError as exc:
        raise _usage(str(exc)) from None
    return str(text).strip()


class _Group:
    """An option group that records each option's default in DEFAULTS, and its parser in PARSERS,
    as it adds it."""

    def __init__(self, group):
        self._group = group

    def addoption(self, flag: str, parse=None, **kwargs) -> None:
        dest = flag[2:].replace("-", "_")
        if parse is not None:
            kwargs.setdefault("metavar", "|".join(parse.choices) if hasattr(parse, "choices") else "N")
        self._group.addoption(flag, **kwargs)
        DEFAULTS[dest] = kwargs.get("default")
        if parse is not None:
            PARSERS[dest] = parse


def add_options(parser) -> None:
    group = _Group(parser.getgroup("attn", "attention backends (pytest-attn)"))
    group.addoption("--attn-backend", action="append", default=[], metavar="NAME[,NAME...]",
                    help="backends to test (repeatable; 'all' = every registered backend); also adds the bundled "
                         "validation suite to this run (see --attn-suite). Default: every backend available here.")
    group.addoption("--attn-suite", parse=_choice(*SUITE_MODES), default="auto",
                    help="run pytest-attn's bundled suite with this run's tests: 'auto' (default) when "
                         "--attn-backend is given and no test paths are, 'on' always, 'off' never.")
    group.addoption("--attn-device", default=None, metavar="DEVICE",
                    help="cpu, cuda or cuda:N. Default: cuda when torch sees a GPU, else cpu.")
    group.addoption("--attn-dtype", action="append", default=[], metavar="DTYPE[,DTYPE...]",
                    help="run every case in these dtypes (bfloat16/bf16, float16/fp16, float32/fp32) "
                         "instead of each case's own.")
    group.addoption("--attn-seed", parse=_parse_seed, default=None,
                    help=f"seed of all generated inputs (default: ${SEED_ENV} or 20261125).")
    group.addoption("--attn-strict", action="store_true", default=False,
                    help="fail, instead of skip, when a backend is unavailable or does not support a case.")
    group.addoption("--attn-allow-unavailable", action="store_true", default=False,
                    help="let a run pass in which a backend named with --attn-backend is unavailable here and so ran "
                         "no test (for CPU-only CI that names GPU backends); by default such a run fails.")
    group.addoption("--attn-cases", action="append", default=[], metavar="NAME|TAG[,...]",
                    help="only catalog cases with these names or tags (see `pytest-attn cases`).")
    group.addoption("--attn-case-file", action="append", default=[], metavar="PATH[,PATH...]",
                    help="also run the cases in these files (.json: a case or a list; .jsonl: a case a line) or "
                         "folders of them, beside the catalog's (repeatable); --attn-cases selects them by name "
                         "(see docs/cases-as-data.md).")
    group.addoption("--attn-fuzz", parse=_fuzz_tier, default=None, metavar="ci|nightly|N",
                    help="also run seeded random cases within each backend's capabilities, named fuzz-SEED-I: "
                         "ci (16 small), nightly (256 larger) or N of the ci sizes; from --attn-seed.")
    group.addoption("--attn-max-tokens", parse=_integer, default=None,
                    help="deselect cases with sequences longer than N tokens (default 2048 on cpu, "
                         "no limit on cuda; 0 = no limit).")
    group.addoption("--attn-isolate", action="append", default=[], metavar="NAME[,NAME...]",
                    help="run these backends' tests ('all': every test) each in a fresh subprocess, so a "
                         "crash or a poisoned CUDA context fails only that test.")
    group.addoption("--attn-gpus", default=None, metavar="IDS",
                    help="GPUs for xdist workers, round robin (e.g. 0,1). Default: CUDA_VISIBLE_DEVICES "
                         "or every GPU torch sees.")
    group.addoption("--attn-schedule", parse=_choice("longest-first", "xdist"), default="longest-first",
                    help="under xdist (--dist load or worksteal): run the longest tests first, by the "
                         "durations earlier runs recorded (default), or leave xdist's order alone.")
    group.addoption("--attn-report", action="append", default=[], metavar="PATH",
                    help="at the end of the run, write its report: the support matrix (backends by the catalog's "
                         "dimensions), skip reasons, failures with rerun commands, the environment and benchmarks; "
                         "the suffix picks the format: .html (self-contained), .md or .json (repeatable).")
    group.addoption("--attn-trace", parse=_choice("on", "off"), default="on",
                    help="record each plan's kernels with torch.profiler and check them against the kernel families "
                         "the backend declares (Backend.expected_kernels): 'on' (default) or 'off'.")
    group.addoption("--attn-known-failures", action="append", default=[], metavar="PATH",
                    help="a known-failures file (TOML, docs/known-failures.md) added to the built-in ones: each "
                         "(backend, case or condition) it lists must fail (strict xfail); repeatable.")
    group.addoption("--attn-gc-freeze", parse=_choice("on", "off"), default="on",
                    help="keep the garbage collector off the objects alive after collection and after "
                         "the last test (gc.freeze; default on).")
    bench = _Group(parser.getgroup("attn-bench", "attention benchmarks (pytest-attn, with pytest-benchmark)"))
    bench.addoption("--attn-bench-warmup", parse=_integer, default=10,
                    help="warm-up calls before timing (default 10); first-call costs stay out.")
    bench.addoption("--attn-bench-iters", parse=_integer, default=50,
                    help="timed calls per benchmark (default 50).")
    bench.addoption("--attn-bench-cold-l2", action="store_true", default=False,
                    help="flush the GPU's L2 cache before each timed call.")
    bench.addoption("--attn-bench-graph", parse=_choice("auto", "on", "off"), default="auto",
                    help="time CUDA-graph replays where the backend can be captured (auto), always, or never.")
    bench.addoption("--attn-bench-metric", action="append", default=[], metavar="device|eager",
                    help="what pytest-benchmark records (and so what --benchmark-compare-fail gates): 'device' "
                         "(device time, CUDA-graph replay where possible; default) or 'eager' (wall time of one "
                         "uncaptured call, host overhead included). Repeat or comma-separate for both.")
    bench.addoption("--attn-gate", default=None, metavar="BASELINE",
                    help="end the run with pytest-attn's performance gate against BASELINE (a saved run's JSON, or a "
                         "folder such as .benchmarks: its newest): a row regresses when the bootstrap interval of its "
                         "median ratio lies past half its threshold and reaches it; a table of those rows and exit 1.")
    bench.addoption("--attn-gate-threshold", action="append", default=[], metavar="REGIME=FRACTION",
                    help="the gate's threshold per regime (default device=0.05,eager=0.10); a row's "
                         "attn_gate_threshold marker overrides it.")
    bench.addoption("--attn-gate-cpu", action="store_true", default=False,
                    help="gate CPU timings too (by default a CPU run's gate table is shown but never fails the run).")


def given(config) -> list[str]:
    """The pytest-attn options this run was given (on the command line, in addopts or
    $PYTEST_ADDOPTS), even at their default values, or set by a plugin to other values."""
    import shlex

    words = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))]
    try:
        words += list(config.getini("addopts"))
    except (ValueError, KeyError):
        pass
    found = []
    for dest, default in DEFAULTS.items():
        flag = "--" + dest.replace("_", "-")
        named = any(str(w) == flag or str(w).startswith(flag + "=") for w in words)
        value = config.getoption(dest, default)
        if named or (value != default and not (value in (None, []) and default in (None, []))):
            found.append(flag)
    return found


def _usage(message: str):
    return pytest.UsageError(f"pytest-attn: {message}")


DEFAULT_SEED = 20261125
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
#: Options that take comma lists: given but empty (an unset $VARIABLE) is a usage error, never "nothing".
LIST_OPTIONS = ("attn_backend", "attn_cases", "attn_case_file", "attn_dtype", "attn_isolate", "attn_bench_metric",
                "attn_report", "attn_known_failures", "attn_gate_threshold")


def split_list(config, dest: str) -> list[str]:
    """The comma-separated, repeatable values of a list option, in order, blanks dropped."""
    return [part.strip() for item in config.getoption(dest, None) or [] for part in str(item).split(",")
            if part.strip()]


def _parse_seed(text: str, source: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise _usage(f"{source}={text!r} is not an integer; give a seed from 0 to {MAX_SEED}") from None
    if not 0 <= value <= MAX_SEED:
        raise _usage(f"{source}={value} is out of range; give a seed from 0 to {MAX_SEED}")
    return value


def env_seed() -> Optional[int]:
    """$PYTEST_ATTN_SEED, checked; None when unset or blank."""
    env = os.environ.get(SEED_ENV)
    if env is None or not env.strip():
        return None
    return _parse_seed(env, f"${SEED_ENV}")


def seed(config) -> int:
    value = config.getoption("attn_seed", None)
    if value is not None:
        return _parse_seed(str(value), "--attn-seed")
    from_env = env_seed()
    return DEFAULT_SEED if from_env is None else from_env


def bench_metrics(config) -> tuple[str, ...]:
    values = split_list(config, "attn_bench_metric") or ["device"]
    bad = [m for m in values if m not in BENCH_METRICS]
    if bad:
        raise _usage(f"--attn-bench-metric={','.join(bad)}: use device, eager, or both (device,eager)")
    return tuple(dict.fromkeys(values))


def gate_thresholds(config) -> dict:
    from pytest_attn.bench.gate import parse_thresholds

    try:
        return parse_thresholds(split_list(config, "attn_gate_threshold"))
    except ValueError as exc:
        raise _usage(f"--attn-gate-threshold {exc}") from None


def _check_gate(config) -> None:
    gate_thresholds(config)
    baseline = config.getoption("attn_gate", None)
    if baseline is not None and not os.path.exists(baseline):
        raise _usage(f"--attn-gate={baseline} does not exist; give a saved run (--benchmark-json FILE) or a folder of "
                     "them (.benchmarks, written by --benchmark-autosave)")


def allow_unavailable(config) -> bool:
    return bool(config.getoption("attn_allow_unavailable", False))


def _check_not_empty(config) -> None:
    for dest in LIST_OPTIONS:
        given = config.getoption(dest, None) or []
        if given and not split_list(config, dest):
            flag = "--" + dest.replace("_", "-")
            raise _usage(f"{flag} is empty (an unset variable?): name at least one value, or leave the option out")


def _check_gpus(config) -> None:
    gpus: Optional[str] = config.getoption("attn_gpus", None)
    if gpus is None:
        return
    from pytest_attn.plugin.xdist.gpu_workers import count_gpus, parse_gpu_ids

    parse_gpu_ids(gpus)
    count, how = count_gpus()  # nvidia-smi first: nothing here may initialise CUDA before workers are pinned
    if not count:
        raise _usage(f"--attn-gpus={gpus} but this machine has no GPU ({how}); leave --attn-gpus out here")


def _parse_given(config) -> None:
    """Each option given as text becomes its value (an int, a checked choice) on config.option."""
    for dest, parse in PARSERS.items():
        text = config.getoption(dest, None)
        if isinstance(text, str):
            setattr(config.option, dest, parse(text, "--" + dest.replace("_", "-")))


def check(config) -> None:
    """Every value this run gave, checked now. Raises pytest.UsageError (exit 4) naming the fix."""
    _parse_given(config)
    _check_not_empty(config)
    limit = config.getoption("attn_max_tokens", None)
    if limit is not None and limit < 0:
        raise _usage(f"--attn-max-tokens={limit}: give a number of tokens >= 1, or 0 for no limit")
    warmup, iters = config.getoption("attn_bench_warmup", 10), config.getoption("attn_bench_iters", 50)
    if iters < 1 or warmup < 0:
        raise _usage(f"--attn-bench-iters must be >= 1 and --attn-bench-warmup >= 0 (got {iters} and {warmup})")
    bench_metrics(config)
    _check_gate(config)
    seed(config)
    _check_gpus(config)
