"""Known failures as data: the files, their loader, the backends' decisions reading them, and the
plugin making a listed failure a strict expected failure (fixed upstream when it passes)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from backend_packages import CASE_TEST, write_backend_package

from pytest_attn.core.layer import LayerSpec
from pytest_attn.env import known_failures as known

BUILTIN = Path(__file__).resolve().parents[1] / "backends" / "known_failures"


def write(tmp_path, text: str, name="known.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- the files and the loader ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flashinfer.toml", "trtllm.toml", "torch_sdpa.toml"])
def test_each_builtin_file_loads_and_every_entry_cites_a_thread_and_a_condition_or_cases(name):
    entries = known.load_file(BUILTIN / name)
    assert entries and all(e.url and e.reason and (e.condition or (e.cases and e.backends)) for e in entries)
    assert all(e.url.startswith("https://github.com/") or e.url.startswith("docs/measured.md") for e in entries)


def test_the_hazards_once_in_backend_code_are_all_in_the_files():
    ids = {e.id for name in ("flashinfer.toml", "trtllm.toml", "torch_sdpa.toml")
           for e in known.load_file(BUILTIN / name)}
    assert ids == {"flashinfer-4299", "flashinfer-fa2-hd192-config", "flashinfer-cuda-core-decode-head-dim",
                   "flashinfer-fa3-paged-vo-stride", "flashinfer-4972", "trtllm-10102-fmha-cross",
                   "torch-sdpa-cudnn-one-key", "flashinfer-mla-fp8-output-factor"}


@pytest.mark.parametrize("text, message", [
    ("[[failure]\nid = 'x'", "not valid TOML"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\nseverity = 1", "unknown field(s) severity"),
    ("[[failure]]\nid = 'x'\nreason = 'r'\ncases = ['c']", "entry 1 (x): needs url"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'", "needs a condition (decided by the backend) or cases"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\nlibrary = 'torch'\nversions = 'new'",
     "versions 'new' is not a version specifier"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\nversions = '>=1'", "versions needs library"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\narch = ['hopper']", "arch hopper: name GPU"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\nrun = 'no'", "run must be true or false"),
    ("[[failure]]\nid = 'x y'\nurl = 'u'\nreason = 'r'\ncases = ['c']", "id 'x y' may hold letters"),
    ("[[failure]]\nid = 'x'\nurl = 'u'\nreason = 'r'\ncases = ['c']\n[[failure]]\nid = 'x'\nurl = 'u'\n"
     "reason = 'r'\ncases = ['d']", "id 'x' appears twice"),
    ("failure = 3", "failure must be an array of tables"),
    ("[failures]\nid = 'x'", "unknown top-level key(s) failures"),
])
def test_a_malformed_file_is_one_line_naming_the_file_and_the_fix(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(known.KnownFailuresFileError) as error:
        known.load_file(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_entry_holds_within_its_versions_architectures_and_backends(tmp_path):
    (entry,) = known.load_file(write(tmp_path, """
        [[failure]]
        id = "x"
        backends = ["flashinfer*"]
        cases = ["c"]
        library = "flashinfer-python"
        versions = ">=0.6,<=0.7.2.post1"
        arch = ["sm90", "sm100"]
        url = "https://example.org/1"
        reason = "r"
    """))
    assert entry.applies(backend="flashinfer-fa2", version="0.7.2.post1", arch="sm90")
    assert not entry.applies(backend="flashinfer", version="0.7.3", arch="sm90")  # fixed in a later release
    assert not entry.applies(backend="flashinfer", version="0.7.2", arch="sm120")
    assert not entry.applies(backend="torch", version="0.7.2", arch="sm90")
    assert entry.applies(backend="flashinfer")  # a plan made without the library or a GPU assumes the target
    assert known.arch_name((10, 0)) == "sm100" and known.arch_name((12, 1)) == "sm121"


# -- the backends decide, the files hold the data ---------------------------------------------------------
def test_flashinfer_hazards_cite_their_entries_and_follow_the_data(tmp_path, monkeypatch):
    from pytest_attn_backends import flashinfer as fi

    hd80, hd96 = LayerSpec(8, 8, 80), LayerSpec(8, 8, 96)
    (crash,) = fi.kernel_hazards("fa2", hd80, (9, 0))
    assert "#4299" in crash and "known failure flashinfer-4299: https://github.com/flashinfer-ai/flashinfer/issues/4299" in crash
    # the same decision on other data: a file that says multiples of 32 are safe
    text = (BUILTIN / "flashinfer.toml").read_text().replace("multiple_of = 64", "multiple_of = 32")
    monkeypatch.setattr(fi.KNOWN, "path", write(tmp_path, text, "flashinfer.toml"))
    assert fi.kernel_hazards("fa2", hd80, (9, 0)) and fi.kernel_hazards("fa2", hd96, (9, 0)) == []
    monkeypatch.undo()
    assert fi.kernel_hazards("fa2", hd96, (9, 0))  # the built-in file again


def test_an_entry_bounded_to_an_architecture_lapses_elsewhere():
    from pytest_attn_backends import flashinfer as fi

    layer = LayerSpec(8, 8, 192)
    (reason,) = fi.kernel_hazards("fa2", layer, (9, 0))
    assert "known failure flashinfer-fa2-hd192-config" in reason
    assert fi.kernel_hazards("fa2", layer, (10, 0)) == []  # measured on sm90 only: elsewhere it runs, unlisted


def test_trtllm_cross_and_sdpa_cudnn_one_key_cite_their_entries():
    from pytest_attn.core.metadata import AttentionMetadata
    from pytest_attn_backends import torch_sdpa, trtllm

    layer = LayerSpec(8, 8, 64)
    reasons = trtllm.fmha_hazards(layer, AttentionMetadata.cross([2, 3], [7, 4]), (9, 0), trtllm.Budget(None, None),
                                  "SEPARATE_Q_K_V")
    assert any("known failure trtllm-10102-fmha-cross: https://github.com/NVIDIA/TensorRT-LLM/issues/10102" in r
               for r in reasons)
    (one_key,) = torch_sdpa.forced_kernel_reasons("cudnn", layer, False, (1, 5), (9, 0))
    assert "known failure torch-sdpa-cudnn-one-key" in one_key
    assert torch_sdpa.forced_kernel_reasons("cudnn", layer, False, (1, 5), (10, 0)) == []


def test_a_lifted_entry_is_not_refused_and_comes_back_after():
    from pytest_attn_backends import flashinfer as fi

    hd80 = LayerSpec(8, 8, 80)
    with known.lift(["flashinfer-4299"]):
        assert fi.kernel_hazards("fa2", hd80, (9, 0)) == []
    assert fi.kernel_hazards("fa2", hd80, (9, 0))


def test_a_condition_without_the_params_it_reads_names_the_entry(tmp_path, monkeypatch):
    from pytest_attn_backends import flashinfer as fi

    text = (BUILTIN / "flashinfer.toml").read_text().replace("params = { multiple_of = 64 }\n", "")
    monkeypatch.setattr(fi.KNOWN, "path", write(tmp_path, text, "flashinfer.toml"))
    with pytest.raises(known.KnownFailuresFileError, match="entry flashinfer-4299: condition fa2-head-dim needs "
                                                           "params 'multiple_of'"):
        fi.kernel_hazards("fa2", LayerSpec(8, 8, 80), (9, 0))


# -- in a run --------------------------------------------------------------------------------------------
PLANTED = '''
import dataclasses
from pathlib import Path

from pytest_attn.env import known_failures
from pytest_attn_backends.torch_sdpa import TorchSDPABackend

KNOWN = known_failures.Family("planted", Path(__file__).with_name("planted.toml"))


class WrongScale(TorchSDPABackend):
    """Wrong on every case (scale doubled)."""

    def forward(self, q, k, v, metadata, plan, out=None, **kwargs):
        plan = dataclasses.replace(plan, layer=dataclasses.replace(plan.layer, sm_scale=plan.layer.scale * 2))
        return super().forward(q, k, v, metadata, plan, out=out, **kwargs)


class RefusesHd80(TorchSDPABackend):
    """Refuses head_dim 80 as a known failure (the condition is decided here, the data is in
    planted.toml); wrong there when it runs, unless it is the fixed one."""

    def __init__(self, name, wrong=True, marker=None):
        super().__init__(name=name)
        self.wrong, self.marker = wrong, marker

    def unsupported(self, layer, metadata, device="cpu"):
        return super().unsupported(layer, metadata, device) + KNOWN.reasons(
            self.name, holds=lambda params: layer.head_dim in params["head_dims"], hd=layer.head_dim)

    def forward(self, q, k, v, metadata, plan, out=None, **kwargs):
        if self.marker:
            Path(self.marker).write_text("ran")
        if self.wrong and plan.layer.head_dim == 80:
            plan = dataclasses.replace(plan, layer=dataclasses.replace(plan.layer, sm_scale=plan.layer.scale * 2))
        return super().forward(q, k, v, metadata, plan, out=out, **kwargs)


wrong = WrongScale(name="wrongscale")
right = TorchSDPABackend(name="rightscale")
refuses = RefusesHd80("refuseshd80")
fixed = RefusesHd80("fixedhd80", wrong=False)
crashes = RefusesHd80("crasheshd80", marker=str(Path(__file__).with_name("crashes-ran")))
'''
PLANTED_TOML = '''
[[failure]]
id = "planted-hd80"
condition = "refuseshd80"
params = { head_dims = [80] }
url = "https://example.org/planted/80"
reason = "wrong at head_dim {hd}"

[[failure]]
id = "planted-fixed-hd80"
condition = "fixedhd80"
params = { head_dims = [80] }
url = "https://example.org/planted/fixed"
reason = "was wrong at head_dim {hd}"

[[failure]]
id = "planted-crash-hd80"
condition = "crasheshd80"
params = { head_dims = [80] }
run = false
url = "https://example.org/planted/crash"
reason = "crashes at head_dim {hd}"
'''
USER_TOML = '''
[[failure]]
id = "user-scale"
backends = ["wrongscale", "rightscale"]
cases = ["hd64-ragged"]
url = "https://example.org/user/scale"
reason = "the scale is doubled"
'''


@pytest.fixture
def planted(pytester):
    site = write_backend_package(pytester, "planted_attn", PLANTED, {
        name: f"planted_attn:{var}" for name, var in (("wrongscale", "wrong"), ("rightscale", "right"),
                                                       ("refuseshd80", "refuses"), ("fixedhd80", "fixed"),
                                                       ("crasheshd80", "crashes"))})
    (site / "planted.toml").write_text(PLANTED_TOML)
    (pytester.path / "user.toml").write_text(USER_TOML)
    pytester.makepyfile(CASE_TEST)
    yield site
    known._FAMILY_FILES.pop("planted", None)
    known._LOADED = None


def test_a_listed_case_that_fails_is_an_expected_failure_naming_its_entry(pytester, planted):
    result = pytester.runpytest("--attn-backend=wrongscale", "--attn-cases=hd64-ragged",
                                "--attn-known-failures=user.toml", "-rx", "--attn-report=run.json")
    result.assert_outcomes(xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*known failure user-scale (https://example.org/user/scale): still fails: "
                                 "AttnCheckFailure*"])
    [test] = json.loads((pytester.path / "run.json").read_text())["tests"]
    assert test["kind"] == "known-failure" and test["reason"].startswith("known failure user-scale")


def test_without_the_file_the_same_failure_is_a_regression(pytester, planted):
    result = pytester.runpytest("--attn-backend=wrongscale", "--attn-cases=hd64-ragged")
    result.assert_outcomes(failed=1)


def test_a_listed_case_that_passes_fails_the_run_as_fixed_upstream(pytester, planted):
    result = pytester.runpytest("--attn-backend=rightscale", "--attn-cases=hd64-ragged",
                                "--attn-known-failures=user.toml")
    result.assert_outcomes(failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*fixed upstream: known failure user-scale (https://example.org/user/scale) now "
                                 "passes on rightscale: remove the entry from *user.toml*"])


def test_a_refusal_citing_a_known_failure_runs_and_must_fail(pytester, planted):
    """The backend refuses head_dim 80 citing planted-hd80; the run lifts the entry, runs the case,
    sees it fail: an expected failure. head_dim 64 is not listed and passes."""
    result = pytester.runpytest("--attn-backend=refuseshd80", "--attn-cases=hd64-ragged,hd80-ragged", "-rx")
    result.assert_outcomes(passed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*hd80-ragged*known failure planted-hd80 (https://example.org/planted/80): "
                                 "still fails: AttnCheckFailure*"])


def test_a_refusal_whose_failure_is_gone_fails_the_run_as_fixed_upstream(pytester, planted):
    result = pytester.runpytest("--attn-backend=fixedhd80", "--attn-cases=hd80-ragged")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fixed upstream: known failure planted-fixed-hd80 (https://example.org/planted/fixed)"
                                 " now passes on fixedhd80: remove the entry from *planted.toml*"])


def test_an_entry_that_must_not_run_is_an_expected_failure_without_running(pytester, planted):
    result = pytester.runpytest("--attn-backend=crasheshd80", "--attn-cases=hd80-ragged", "-rx")
    result.assert_outcomes(xfailed=1)
    result.stdout.fnmatch_lines(["*XFAIL*known failure planted-crash-hd80 (https://example.org/planted/crash): not run "
                                 "(it crashes the process): crashes at head_dim 80*"])
    assert not (planted / "crashes-ran").exists()


PLAN_TEST = """
from pytest_attn.check.harness import first_step
from pytest_attn.core import calls

def test_plan_only(attn_backend, attn_case, attn_device):
    metadata, layer = first_step(attn_case, attn_device)
    calls.require_supported(attn_backend, layer, metadata, attn_device)
    calls.plan(attn_backend, metadata, layer, attn_device)
"""


def test_a_test_that_launches_nothing_neither_fails_nor_fixes_a_listed_case(pytester, planted):
    """A plan check of a listed (backend, case) passes as it did (the kernel never ran, so nothing
    is fixed), and one refused for a known failure is skipped as it was."""
    pytester.makepyfile(test_plans_only=PLAN_TEST)
    listed = pytester.runpytest("test_plans_only.py", "--attn-backend=wrongscale", "--attn-cases=hd64-ragged",
                                "--attn-known-failures=user.toml")
    listed.assert_outcomes(passed=1)
    refused = pytester.runpytest("test_plans_only.py", "--attn-backend=fixedhd80", "--attn-cases=hd80-ragged", "-rs")
    refused.assert_outcomes(skipped=1)
    refused.stdout.fnmatch_lines(["*was wrong at head_dim 80 (known failure planted-fixed-hd80: *"])


@pytest.mark.parametrize("content", ["[[failure]\n", "[[failure]]\nid = 'x'\nreason = 'r'\ncases = ['c']\n"])
def test_a_malformed_user_file_is_a_one_line_usage_error(pytester, planted, content):
    (pytester.path / "bad.toml").write_text(content)
    result = pytester.runpytest("--attn-backend=rightscale", "--attn-cases=hd64-ragged",
                                "--attn-known-failures=bad.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: pytest-attn: known-failures file bad.toml")
    assert "leave --attn-known-failures out" in errors[0] and "Traceback" not in result.stderr.str()


def test_a_missing_user_file_is_a_usage_error(pytester, planted):
    result = pytester.runpytest("--attn-backend=rightscale", "--attn-known-failures=nowhere.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-attn: known-failures file nowhere.toml: cannot read it*"])


def test_a_user_entry_reusing_a_builtin_id_is_refused(pytester, planted):
    (pytester.path / "dup.toml").write_text('[[failure]]\nid = "flashinfer-4299"\nurl = "u"\nreason = "r"\n'
                                            'cases = ["c"]\n')
    result = pytester.runpytest("--attn-backend=flashinfer", "--attn-allow-unavailable",
                                "--attn-known-failures=dup.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*id 'flashinfer-4299' is already defined in *flashinfer.toml; give it another id*"])


def test_a_test_that_compares_no_output_is_not_judged_by_a_wrong_output_entry(pytester, planted):
    """Seen on an H200: determinism tests of listed (backend, case) pairs reported the entries
    'fixed upstream'. A test marked attn_no_output_check (kernel traces, determinism) is neither
    expected to fail nor counted as a fix; the output check still is."""
    pytester.makepyfile(test_bits='''
import pytest
from pytest_attn.check.harness import run_case

@pytest.mark.attn_no_output_check
def test_runs_without_comparing(attn_backend, attn_case, attn_device, attn_seed):
    run_case(attn_backend, attn_case, device=attn_device, seed=attn_seed)
''')
    result = pytester.runpytest("--attn-backend=rightscale", "--attn-cases=hd64-ragged",
                                "--attn-known-failures=user.toml", "test_bits.py")
    result.assert_outcomes(passed=1)
    assert result.ret == 0
