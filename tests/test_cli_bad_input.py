"""Bad input to `pytest-attn` is one line on stderr, exit 4, never a traceback: random bad values for
every subcommand's arguments, fed in-process (fast), and a real process for the exit status.

Values are given as --option=VALUE, so that one starting with '-' is still that option's value (and
not, say, --help); positional ones come after '--'."""
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_attn.cli import args
from pytest_attn.cli import main as cli
from pytest_attn.cases.catalog import CATALOG
from pytest_attn.env.registry import Registry

REGISTERED = set(Registry.discover().names) | {"all"}
KNOWN_CASE_WORDS = set(CATALOG) | {t for c in CATALOG.values() for t in c.tags}
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# -- bad values ----------------------------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
NOT_AN_INT = ANY_TEXT.filter(lambda t: not _is_int(t))


def below(minimum: int):
    """Text that is not an integer >= minimum: a smaller integer, or not an integer at all."""
    return st.one_of(st.integers(max_value=minimum - 1).map(str), NOT_AN_INT)


BAD_LENGTHS = st.one_of(  # a comma list with at least one part that is not a length >= 1, or nothing in it
    st.lists(st.one_of(st.integers(min_value=1, max_value=9999).map(str), below(1)), min_size=1, max_size=4)
    .filter(lambda parts: any(p.strip() and not (_is_int(p) and int(p) >= 1) for p in parts)).map(",".join),
    st.sampled_from(["", " ", ",", " , ,"]),
)
UNKNOWN_NAMES = ANY_TEXT.filter(lambda t: "," not in t and t.strip() and t.strip() not in REGISTERED)
BAD_DEVICES = ANY_TEXT.filter(lambda t: t.strip() != "cpu")  # this machine has no CUDA: cuda and cuda:N are bad too
BAD_PLOTS = st.one_of(ANY_TEXT.filter(lambda t: not t.lower().endswith(args.PLOT_SUFFIXES)),
                      st.sampled_from(["/proc/no/such/plot.txt", "."]))
SAFE_PATH = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/" + LINE_BREAKS),
                    min_size=1, max_size=12).filter(lambda t: t not in (".", ".."))
UNKNOWN_CASES = ANY_TEXT.filter(lambda t: t not in CATALOG)
UNKNOWN_FILTERS = ANY_TEXT.filter(lambda t: t not in KNOWN_CASE_WORDS)

SEED_TABLE = "seed-table", "--device=cpu", "--no-mix", "--seq-lens=64", "--iters=1", "--warmup=0"
DIFFERENTIAL = "differential", "--device=cpu"

BAD_ARGUMENTS = st.one_of(
    # seed-table: numbers, lengths, names, device, plot, choices, options that need a GPU
    st.builds(lambda v: [*SEED_TABLE, f"--iters={v}"], below(1)),
    st.builds(lambda v: [*SEED_TABLE, f"--warmup={v}"], below(0)),
    st.builds(lambda v: [*SEED_TABLE, f"--max-seq={v}"], below(0)),
    st.builds(lambda v: [*SEED_TABLE, f"--seed={v}"], below(0)),
    st.builds(lambda v: [*SEED_TABLE, f"--seq-lens={v}"], BAD_LENGTHS),
    st.builds(lambda v: [*SEED_TABLE, f"--backends={v}"], st.one_of(UNKNOWN_NAMES, st.sampled_from(["", ",", " "]))),
    st.builds(lambda v: [*SEED_TABLE, f"--a={v}", "--b=torch"], UNKNOWN_NAMES),
    st.builds(lambda v: [*SEED_TABLE, f"--a={v}"], ANY_TEXT.filter(bool)),  # --a without --b
    st.builds(lambda v: [*SEED_TABLE, f"--device={v}"], BAD_DEVICES),
    st.builds(lambda v: [*SEED_TABLE, f"--plot={v}"], BAD_PLOTS),
    st.builds(lambda v: [*SEED_TABLE, f"--graph={v}"], ANY_TEXT.filter(lambda t: t not in ("auto", "on", "off"))),
    st.just([*SEED_TABLE, "--graph=on"]), st.just([*SEED_TABLE, "--cold-l2"]),
    st.just([*SEED_TABLE, "--a=torch", "--b=torch"]),
    st.just([*SEED_TABLE, "--a=torch", "--b=flex", "--backends=torch"]),
    st.just([*SEED_TABLE, "--max-seq=16"]),
    # differential: case, backends, device, seed
    st.builds(lambda v: ["differential", "--device=cpu", "--", v], UNKNOWN_CASES),
    st.builds(lambda v: [*DIFFERENTIAL, f"--backends={v}", "hd64-ragged"],
              st.one_of(UNKNOWN_NAMES, UNKNOWN_NAMES.map(lambda n: f"torch,{n}"), st.sampled_from(["", ",", " "]))),
    st.builds(lambda v: [*DIFFERENTIAL, f"--seed={v}", "hd64-ragged"], below(0)),
    st.builds(lambda v: ["differential", f"--device={v}", "hd64-ragged"], BAD_DEVICES),
    # cases, compare, backends, report, unknown commands and options
    st.builds(lambda v: ["cases", "--", v], UNKNOWN_FILTERS),
    st.builds(lambda v: ["compare", "--", v], SAFE_PATH),
    st.builds(lambda v: ["compare", f"--plot={v}", "--", "missing.json"], BAD_PLOTS),
    st.builds(lambda v: ["backends", "--", v], ANY_TEXT),
    st.builds(lambda v: ["report", "--", v], SAFE_PATH),
    st.builds(lambda v: [v], ANY_TEXT.filter(lambda t: t not in {"seed-table", "compare", "cases", "differential",
                                                                 "backends", "report", "vit-table", "gate", "ab",
                                                                 "history", "trace", "properties", "minimize",
                                                                 "export-cases"} and not t.startswith("-"))),
    st.builds(lambda c, v: [c, f"--{v}=1"], st.sampled_from(["seed-table", "compare", "cases", "differential",
                                                               "backends", "report"]),
              st.text("abcxyz", min_size=1, max_size=8).filter(lambda t: t not in ("a", "b"))),
)


def _main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's errors (our _Parser exits 4)
        return exc.code


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.filter_too_much])
@given(argv=BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_exit_4_and_no_traceback(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths (compare, report) name nothing that exists
    code = _main(argv)
    out, err = capsys.readouterr()
    assert code == args.USAGE, (argv, code, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.splitlines() == [err[:-1]], (argv, err)
    assert err.startswith("pytest-attn") and "Traceback" not in err, (argv, err)
    assert out == "", (argv, out)  # nothing was run
    if argv[0] != "report":  # the report's messages are its own module's (report_render)
        assert "; " in err, f"no 'what to do' after the error: {err!r}"


def test_one_line_writes_out_every_line_break():
    text = "a" + LINE_BREAKS.join("xy") + "b"
    assert len(cli.one_line(text).splitlines()) == 1
    assert cli.one_line("µs per token; 128,1024") == "µs per token; 128,1024"  # only line breaks change


@pytest.mark.parametrize("argv, message", [
    (["differential", "vit-1img-224", "--device", "foo"],
     "pytest-attn differential: argument --device: 'foo': use cpu, cuda or cuda:N"),
    (["seed-table", "--device", "cpu", "--plot", "seed.txt"],
     "pytest-attn seed-table: argument --plot: 'seed.txt': the suffix picks the format; end it in .png, .svg, .pdf"),
    (["ab", "--base", "torch", "--head", "flex", "--device", "cpu", "--json", ""],
     "pytest-attn ab: argument --json: is empty (an unset variable?); give a file name, e.g. result.json"),
    (["ab", "--base", "torch", "--head", "flex", "--device", "cpu", "--json", "."],
     "pytest-attn ab: argument --json: '.' is a folder; give a file name in it"),
    (["ab", "--base", "torch", "--head", "flex", "--device", "cpu", "--json", "/proc/ab.json"],  # checked before timing
     "pytest-attn ab: argument --json: '/proc/ab.json': cannot write under /proc; give a path in a folder you can "
     "write to"),
    (["seed-table", "--device", "cpu", "--graph", "on"],
     "pytest-attn seed-table: --graph on times CUDA-graph replays and a CPU has none; leave it out"),
])
def test_a_real_process_exits_4_with_one_line(argv, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest_attn.cli.main", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 4, done.stderr
    assert re.fullmatch(r"[^\n]+\n", done.stderr) and done.stderr.startswith(message), done.stderr
    assert done.stdout == ""
