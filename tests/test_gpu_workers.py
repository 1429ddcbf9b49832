"""One GPU per xdist worker: which ids, the round robin, the header, and (through a real -n 2 run
with fake GPU ids) that each worker sees only its own GPU before anything touches CUDA."""
from types import SimpleNamespace

import pytest

from pytest_attn.plugin.xdist import gpu_workers
from pytest_attn.plugin.xdist.gpu_workers import XdistHooks


class FakeConfig:
    """What gpu_workers reads of a pytest Config: options, the stash, and for a worker workerinput."""

    def __init__(self, attn_gpus=None, dist="no", tx=(), workerinput=None):
        self.option = SimpleNamespace(attn_gpus=attn_gpus, dist=dist, tx=list(tx))
        self.stash = pytest.Stash()
        if workerinput is not None:
            self.workerinput = workerinput

    def getoption(self, name, default=None):
        return getattr(self.option, name, default)


def fake_node(worker_id):
    return SimpleNamespace(gateway=SimpleNamespace(id=worker_id), workerinput={})


# -- ids ------------------------------------------------------------------------------------------
def test_gpu_ids_are_indices_or_uuids():
    assert gpu_workers.parse_gpu_ids(" 0, 1 ,") == ["0", "1"]
    assert gpu_workers.parse_gpu_ids("GPU-8a2f-77,MIG-1c3d-0") == ["GPU-8a2f-77", "MIG-1c3d-0"]
    with pytest.raises(pytest.UsageError, match=r"--attn-gpus='0,cuda:1': 'cuda:1' is not a GPU index or UUID"):
        gpu_workers.parse_gpu_ids("0,cuda:1")
    with pytest.raises(pytest.UsageError, match="--attn-gpus is empty"):
        gpu_workers.parse_gpu_ids(" , ")


def test_visible_devices_are_read_as_cuda_reads_them():
    assert gpu_workers.parse_visible_devices("3,5") == ["3", "5"]
    assert gpu_workers.parse_visible_devices("-1") == []  # hides every GPU
    assert gpu_workers.parse_visible_devices("") == []
    assert gpu_workers.parse_visible_devices("2,x,4") == ["2"]  # CUDA stops at the first invalid entry


def test_pool_prefers_the_option_then_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_workers.gpu_pool(FakeConfig()) == (["3", "5"], "CUDA_VISIBLE_DEVICES")
    assert gpu_workers.gpu_pool(FakeConfig(attn_gpus="0,1")) == (["0", "1"], "--attn-gpus")


def test_without_cuda_visible_devices_the_gpus_are_counted(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_workers, "count_gpus", lambda: (3, "nvidia-smi -L"))
    assert gpu_workers.gpu_pool(FakeConfig()) == (["0", "1", "2"], "nvidia-smi -L")


def test_worker_count_reads_xdist_options():
    assert gpu_workers.worker_count(FakeConfig()) == 0
    assert gpu_workers.worker_count(FakeConfig(dist="load", tx=["popen"] * 3)) == 3
    assert gpu_workers.worker_count(FakeConfig(dist="load", tx=["2*popen", "popen"])) == 3
    assert gpu_workers.worker_count(FakeConfig(dist="load", tx=["popen"], workerinput={"workerid": "gw0"})) == 0


def test_threads_are_shared_out_between_workers(monkeypatch):
    monkeypatch.setattr(gpu_workers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert gpu_workers.threads_per_worker(4) == 4
    assert gpu_workers.threads_per_worker(32) == 1


# -- assignment -----------------------------------------------------------------------------------
def test_round_robin_and_a_replacement_takes_the_freed_gpu(monkeypatch):
    config = FakeConfig(attn_gpus="3,5", dist="load", tx=["popen"] * 3)
    hooks = XdistHooks(config)
    nodes = [fake_node(f"gw{i}") for i in range(3)]
    for node in nodes:
        hooks.pytest_configure_node(node)
    assert [n.workerinput[gpu_workers.WORKERINPUT_GPU] for n in nodes] == ["3", "5", "3"]
    assert gpu_workers.planned_assignment(["3", "5"], 3) == {"gw0": "3", "gw1": "5", "gw2": "3"}
    hooks.pytest_testnodedown(nodes[1], error="crashed")
    replacement = fake_node("gw3")
    hooks.pytest_configure_node(replacement)
    assert replacement.workerinput[gpu_workers.WORKERINPUT_GPU] == "5"  # not a third worker on GPU 3


def test_no_gpus_pins_nothing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    node = fake_node("gw0")
    XdistHooks(FakeConfig(dist="load", tx=["popen"] * 2)).pytest_configure_node(node)
    assert gpu_workers.WORKERINPUT_GPU not in node.workerinput
    assert node.workerinput[gpu_workers.WORKERINPUT_THREADS] >= 1


def test_jit_builds_get_half_the_cores_each_unless_max_jobs_is_set(monkeypatch):
    monkeypatch.setattr(gpu_workers.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert gpu_workers.jit_jobs_per_build() == 8
    node = fake_node("gw0")
    XdistHooks(FakeConfig(dist="load", tx=["popen"] * 8)).pytest_configure_node(node)
    assert node.workerinput[gpu_workers.WORKERINPUT_JIT_JOBS] == 8
    monkeypatch.setenv("MAX_JOBS", "")  # recorded, so that what pin_worker sets is undone after the test
    monkeypatch.delenv("MAX_JOBS")
    gpu_workers.pin_worker(FakeConfig(workerinput={"workerid": "gw0", gpu_workers.WORKERINPUT_JIT_JOBS: 8}))
    assert gpu_workers.os.environ["MAX_JOBS"] == "8"
    monkeypatch.setenv("MAX_JOBS", "3")  # the user's choice wins
    gpu_workers.pin_worker(FakeConfig(workerinput={"workerid": "gw0", gpu_workers.WORKERINPUT_JIT_JOBS: 8}))
    assert gpu_workers.os.environ["MAX_JOBS"] == "3"


def test_pin_worker_narrows_visible_devices_to_its_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gpu_workers.pin_worker(FakeConfig(workerinput={"workerid": "gw1", gpu_workers.WORKERINPUT_GPU: "5"}))
    assert gpu_workers.os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_serial_run_with_attn_gpus_sees_only_those(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    config = FakeConfig(attn_gpus="2,1")
    gpu_workers.pin_worker(config)
    assert gpu_workers.os.environ["CUDA_VISIBLE_DEVICES"] == "2,1"
    assert gpu_workers.header_lines(config) == ["attn gpus: CUDA_VISIBLE_DEVICES=2,1 (--attn-gpus)"]


def test_header_shows_each_workers_gpu(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    jobs = gpu_workers.jit_jobs_per_build()
    lines = gpu_workers.header_lines(FakeConfig(attn_gpus="0,1", dist="load", tx=["popen"] * 2))
    assert lines == ["attn gpus: gw0 -> GPU 0, gw1 -> GPU 1 (round robin over --attn-gpus; "
                     f"each worker sees only its GPU as cuda:0; MAX_JOBS={jobs} per JIT build)"]


# -- a real run -----------------------------------------------------------------------------------
SEES_ONE_GPU = """
import os
import pytest

@pytest.mark.parametrize("i", range(4))
def test_sees_one_gpu(i, record_property, attn_backend):
    visible = os.environ["CUDA_VISIBLE_DEVICES"]
    print("worker", os.environ["PYTEST_XDIST_WORKER"], "sees", visible)
    assert visible in ("3", "5"), visible
"""


@pytest.mark.attn_long
def test_each_xdist_worker_sees_a_different_single_gpu(pytester, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # fake ids: nothing here initialises CUDA
    pytester.makepyfile(SEES_ONE_GPU)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-rP", "--attn-backend=torch",
                                           "--junitxml=out.xml")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "attn gpus: gw0 -> GPU 3, gw1 -> GPU 5 (round robin over CUDA_VISIBLE_DEVICES; *",
        "*pytest-attn xdist workers*",
        "gw0: GPU 3 (CUDA_VISIBLE_DEVICES=3), * tests",
        "gw1: GPU 5 (CUDA_VISIBLE_DEVICES=5), * tests",
    ])
    seen = {line.split()[1]: line.split()[3] for line in result.stdout.lines if line.startswith("worker gw")}
    assert seen == {"gw0": "3", "gw1": "5"}, result.stdout.str()
    junit = (pytester.path / "out.xml").read_text()
    assert '<property name="attn_gpu" value="3"' in junit and '<property name="attn_gpu" value="5"' in junit
