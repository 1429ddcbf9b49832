"""The plugin's behaviour, through pytester: options, header, IDs, skips, strictness, entry points."""
import subprocess
import sys

import pytest
from backend_packages import CASE_TEST

SMALL = "--attn-cases=hd64-ragged,hd80-ragged"


def test_loading_the_plugin_imports_neither_torch_nor_backends():
    code = ("import sys, pytest_attn, pytest_attn.plugin; "
            "heavy = [m for m in ('torch', 'flashinfer', 'pytest_attn_backends') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_header_names_backends_device_dtypes_and_seed(pytester):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-seed=7", SMALL)
    result.stdout.fnmatch_lines([
        "attn backends: *torch (every available one; choose with --attn-backend)",
        "attn device: cpu, torch *",
        "attn dtypes: each case's own | seed: 7 (rerun with --attn-seed=7) | strict: off | max tokens: 2048*",
    ])
    result.assert_outcomes(passed=2 * len(attn_available_builtins()))


def attn_available_builtins():
    from pytest_attn.env.registry import builtin_backends

    return [b for b in builtin_backends() if b.available()]


def test_unknown_backend_is_a_usage_error_listing_the_registered_ones(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=torch,nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: pytest-attn: unknown attention backend 'nope'; registered: flashinfer, *, torch, *"
                                 "demo, ghost, narrow, forgets (or 'all')"])
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str()


def test_ids_carry_backend_and_case_names(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--co", "-q", "--attn-backend=torch", "--attn-backend=demo,torch", SMALL)
    result.stdout.fnmatch_lines(["*test_case[[]torch-hd64-ragged[]]", "*test_case[[]torch-hd80-ragged[]]",
                                 "*test_case[[]demo-hd64-ragged[]]", "*test_case[[]demo-hd80-ragged[]]",
                                 "4 tests collected*"])


def test_entry_point_backend_runs_and_is_checked(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=demo", SMALL, "--attn-cases=llm-decode-gqa-hnd")
    result.assert_outcomes(passed=3)


def test_default_runs_every_available_backend_and_reports_the_rest(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--co", "-q", "--attn-cases=hd64-ragged")
    names = [b.name for b in attn_available_builtins()] + ["demo", "narrow", "forgets"]
    result.stdout.fnmatch_lines([f"*[[]{name}-hd64-ragged[]]" for name in names] + [f"{len(names)} tests collected*"])
    assert "ghost-hd64-ragged" not in result.stdout.str()
    header = pytester.runpytest("--attn-cases=hd64-ragged", "--attn-backend=torch")
    header.stdout.fnmatch_lines(["attn unavailable: *ghost (needs the ghost library (pip install ghost-attn))"])


def test_unavailable_backend_named_explicitly_skips_with_reason_or_fails_strict(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    skipped = pytester.runpytest("--attn-backend=ghost", "--attn-cases=hd64-ragged", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(["*backend 'ghost' is unavailable here: needs the ghost library*"])
    strict = pytester.runpytest("--attn-backend=ghost", "--attn-cases=hd64-ragged", "--attn-strict")
    strict.assert_outcomes(errors=1)
    strict.stdout.fnmatch_lines(["*unavailable here: needs the ghost library*(--attn-strict)*"])


def test_unsupported_case_skips_with_the_backends_reason_or_fails_strict(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=narrow", SMALL, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*narrow: head_dim 80 not supported (supports [[]64[]])*"])
    strict = pytester.runpytest("--attn-backend=narrow", SMALL, "--attn-strict")
    strict.assert_outcomes(passed=1, failed=1)
    strict.stdout.fnmatch_lines(["*unsupported case under --attn-strict: narrow: head_dim 80 not supported*"])


def test_a_backend_that_leaves_rows_unwritten_fails_with_a_clear_message(pytester, demo_backends):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-backend=forgets", "--attn-cases=vit-ragged-mix")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*backend 'forgets' is wrong on case 'vit-ragged-mix'*",
                                 "*output elements still hold the poison value*never wrote them*"])


def test_gpu_marker_skips_on_cpu_and_fails_under_strict(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.attn_gpu
        def test_needs_gpu():
            pass
    """)
    pytester.runpytest("--attn-device=cpu").assert_outcomes(skipped=1)
    pytester.runpytest("--attn-device=cpu", "--attn-strict").assert_outcomes(errors=1)


def test_max_tokens_deselects_long_cases_on_cpu(pytester):
    pytester.makepyfile(CASE_TEST)
    default = pytester.runpytest("--co", "-q", "--attn-cases=vit", "--attn-backend=torch")
    default.stdout.fnmatch_lines(["*[[]torch-vit-2048[]]", "*(2 deselected)*"])
    assert "vit-4096" not in default.stdout.str()
    unlimited = pytester.runpytest("--co", "-q", "--attn-cases=vit", "--attn-max-tokens=0", "--attn-backend=torch")
    unlimited.stdout.fnmatch_lines(["*[[]torch-vit-8192[]]"])


def test_dtype_option_runs_cases_in_other_dtypes(pytester):
    pytester.makepyfile(CASE_TEST)
    result = pytester.runpytest("--attn-dtype=fp16,float32", "--attn-cases=hd64-ragged", "-v")
    result.stdout.fnmatch_lines(["*[[]torch-hd64-ragged-float16[]] PASSED*", "*[[]torch-hd64-ragged-float32[]] PASSED*"])


def test_bad_option_values_are_usage_errors(pytester):
    pytester.makepyfile(CASE_TEST)
    bad_dtype = pytester.runpytest("--attn-dtype=int8")
    assert bad_dtype.ret == pytest.ExitCode.USAGE_ERROR
    bad_dtype.stderr.fnmatch_lines(["*unsupported dtype 'int8'*"])
    bad_case = pytester.runpytest("--attn-cases=no-such-case")
    assert bad_case.ret == pytest.ExitCode.USAGE_ERROR
    bad_case.stderr.fnmatch_lines(["*unknown case name or tag no-such-case*"])


def test_attn_cases_marker_narrows_the_catalog(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.attn_cases("decode")
        def test_decode_only(attn_case):
            assert attn_case.decode_steps > 0
    """)
    from pytest_attn.cases.catalog import select

    result = pytester.runpytest("-q", "--attn-backend=torch")
    result.assert_outcomes(passed=len(select(["decode"])))


def test_metadata_fixtures_with_and_without_a_cache_manager(pytester):
    pytester.makepyfile("""
        def test_no_cache(attn_metadata_no_cache):
            assert attn_metadata_no_cache.kv_cache_manager is None
            assert attn_metadata_no_cache.num_contexts == attn_metadata_no_cache.num_requests

        def test_paged(attn_metadata_paged):
            md = attn_metadata_paged
            assert md.kv_cache_manager is not None
            assert (md.num_contexts, md.num_generations) == (2, 2)
            assert md.kv_lens == (33, 5, 41, 18)

        def test_factory(make_attn_batch, attn_backend):
            batch = make_attn_batch([1, 1], cached_lens=[40, 7], kv_layout="HND", num_heads=8, num_kv_heads=2,
                                    head_dim=64, mask="causal")
            assert batch.metadata.num_generations == 2
            plan = batch.assert_matches_reference(attn_backend)
            assert plan.reads_cache and plan.layout == "HND"
    """)
    pytester.runpytest("--attn-backend=torch").assert_outcomes(passed=3)
