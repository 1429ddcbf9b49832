"""Determinism: the seed is in the header; a test rerun alone from its ID and that seed gets the
very same inputs (in another process too); a different seed gets different ones; and outcomes do
not change over reruns. Inputs are recorded by a conftest wrapping harness.make_qkv."""
import json
import re

import hypothesis  # noqa: F401  (imported here once: each in-process run would import it again otherwise)
import pytest
import torch
from backend_packages import CASE_TEST

from pytest_attn.check import harness
from pytest_attn.core.contract import LayerSpec

RECORD_INPUTS = """
import hashlib, json, os
import pytest
from pytest_attn.check import harness

@pytest.fixture(autouse=True)
def record_inputs(monkeypatch, request):
    make_qkv = harness.make_qkv

    def recording(num_tokens, layer, device, seed, **kwargs):
        q, k, v = make_qkv(num_tokens, layer, device, seed, **kwargs)
        digest = hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in (q, k, v))).hexdigest()
        with open(os.environ["ATTN_INPUT_LOG"], "a") as f:
            f.write(json.dumps([request.node.nodeid, digest]) + "\\n")
        return q, k, v

    monkeypatch.setattr(harness, "make_qkv", recording)
"""
CASES = ("--attn-cases=hd64-ragged,hd64-decode-page1", "--attn-backend=torch")
DECODE_ID = "test_determinism_pytester.py::test_case[torch-hd64-decode-page1]"


def recorded(log):
    """{test id: [digest of each step's q, k, v]}; the log is emptied for the next run."""
    steps = {}
    for line in log.read_text().splitlines():
        nodeid, digest = json.loads(line)
        steps.setdefault(nodeid, []).append(digest)
    log.unlink()
    return steps


@pytest.mark.attn_long
def test_same_seed_same_inputs_alone_or_in_the_full_run_and_in_another_process(pytester, monkeypatch):
    log = pytester.path / "inputs.jsonl"
    monkeypatch.setenv("ATTN_INPUT_LOG", str(log))
    monkeypatch.setenv("PYTEST_ATTN_SEED", "4242")
    pytester.makeconftest(RECORD_INPUTS)
    pytester.makepyfile(test_determinism_pytester=CASE_TEST)

    full = pytester.runpytest(*CASES)
    full.assert_outcomes(passed=2)
    seed = re.search(r"seed: (\d+) \(rerun with --attn-seed=(\d+)\)", full.stdout.str())
    assert seed and seed.group(1) == seed.group(2) == "4242"
    in_full_run = recorded(log)
    assert len(in_full_run[DECODE_ID]) == 3, "prefill and two decode steps"

    monkeypatch.delenv("PYTEST_ATTN_SEED")  # the rerun has only what the header said
    alone = pytester.runpytest_subprocess(DECODE_ID, f"--attn-seed={seed.group(1)}", "-p", "no:cacheprovider")
    alone.assert_outcomes(passed=1)
    assert recorded(log) == {DECODE_ID: in_full_run[DECODE_ID]}

    other_seed = pytester.runpytest(DECODE_ID, "--attn-seed=4243")
    other_seed.assert_outcomes(passed=1)
    assert set(recorded(log)[DECODE_ID]).isdisjoint(in_full_run[DECODE_ID])


def test_no_outcome_changes_over_five_reruns(pytester):
    pytester.makepyfile(test_reruns=CASE_TEST)
    outcomes = []
    for _ in range(5):
        result = pytester.runpytest(*CASES, "-p", "no:randomly")
        outcomes.append({r.nodeid: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport")
                         if r.when == "call"})
    assert len(outcomes[0]) == 2 and set(outcomes[0].values()) == {"passed"}, outcomes[0]
    assert all(o == outcomes[0] for o in outcomes[1:])


def test_inputs_depend_only_on_seed_and_case():
    layer = LayerSpec(4, 2, 16, "bfloat16")
    seed = harness.derive_seed(7, "hd64-ragged", 0)
    assert seed == harness.derive_seed(7, "hd64-ragged", 0) != harness.derive_seed(7, "hd64-ragged", 1)
    first, again = harness.make_qkv(5, layer, "cpu", seed), harness.make_qkv(5, layer, "cpu", seed)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
