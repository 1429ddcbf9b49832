"""xdist workers: one GPU each, a fair share of CPU threads and of JIT build jobs, and a fresh
worker after a poisoned CUDA context.

The controller decides which GPU each worker gets (round robin over --attn-gpus,
CUDA_VISIBLE_DEVICES, or the GPUs nvidia-smi / torch count) and hands it over in
``node.workerinput``; the worker narrows CUDA_VISIBLE_DEVICES to that one GPU at the very start of
its pytest_configure, before anything can initialise CUDA. Workers are started by execnet as fresh
interpreters (not forked), so counting GPUs in the controller cannot break them.

A failure whose error means the CUDA context is poisoned (an illegal memory access, a device-side
assert) leaves every later kernel of that process failing too. The worker reports that test, then
ends itself when the next test would start; xdist replaces it with a fresh worker on the same GPU
and the not-yet-started test is handed out again, so only the culprit fails.

Nothing here imports torch at module level.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from typing import Optional

import pytest

WORKERINPUT_GPU = "attn_gpu"  # the GPU id (as CUDA_VISIBLE_DEVICES names it) of one worker
WORKERINPUT_THREADS = "attn_torch_threads"
WORKERINPUT_JIT_JOBS = "attn_jit_jobs"
GPU_PROPERTY = "attn_gpu"  # user_properties entry on every test a pinned worker runs (junit shows it)
WORKER_PROPERTY = "attn_worker"
RESTART_PROPERTY = "attn_worker_restart"  # on the report of a test that poisoned its worker's context
EXIT_POISONED = 75  # exit status of a worker that ends itself after a poisoned CUDA context

#: Error texts (lower case) after which a CUDA context cannot be trusted: every later launch in
#: the process fails, or silently reads garbage.
POISONED_CONTEXT_MARKERS = (
    "illegal memory access", "cudaerrorillegaladdress", "cuda_error_illegal_address",
    "device-side assert", "cudaerrorassert", "cuda error", "unspecified launch failure",
    "cudaerrorlaunchfailure", "misaligned address", "illegal instruction",
)

_POOL_KEY = pytest.StashKey[tuple]()
_GPU_ID = re.compile(r"^(\d+|(GPU|MIG)-[0-9A-Za-z-]+)$")


# -- which GPUs --------------------------------------------------------------------------------
def parse_gpu_ids(text: str, source: str = "--attn-gpus") -> list[str]:
    """'0, 1' -> ['0', '1']. Indices or UUIDs (GPU-..., MIG-...), as CUDA_VISIBLE_DEVICES takes them."""
    ids = [part.strip() for part in str(text).split(",") if part.strip()]
    bad = [i for i in ids if not _GPU_ID.match(i)]
    if bad:
        raise pytest.UsageError(f"pytest-attn: {source}={text!r}: {', '.join(map(repr, bad))} is not a GPU index "
                                "or UUID; give a comma list such as --attn-gpus=0,1")
    if source == "--attn-gpus" and not ids:
        raise pytest.UsageError("pytest-attn: --attn-gpus is empty; give a comma list such as --attn-gpus=0,1")
    return ids


def parse_visible_devices(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as the CUDA runtime reads it: entries up to the first invalid one
    ('-1' or '' hide every GPU)."""
    ids = []
    for part in value.split(","):
        part = part.strip()
        if not _GPU_ID.match(part):
            break
        ids.append(part)
    return ids


def count_gpus() -> tuple[int, str]:
    """(number of GPUs, how it was counted), without creating a CUDA context if possible."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
            if listing.returncode == 0:
                return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU ")), "nvidia-smi -L"
        except (OSError, subprocess.SubprocessError):
            pass
    from pytest_attn.env import torch_build

    build = torch_build.installed_build()
    if build is not None and not build.has_gpu_runtime and "torch" not in sys.modules:
        return 0, f"torch {build.version}, a build without CUDA"
    try:
        import torch
    except ImportError:
        return 0, "no nvidia-smi and no torch"
    # Counts through NVML where it can; even if it initialises CUDA here, workers are fresh
    # interpreters started by execnet, not forks of this process.
    return torch.cuda.device_count(), "torch.cuda.device_count()"


def gpu_pool(config) -> tuple[list[str], str]:
    """(GPU ids the workers share round robin, where they came from); computed once per run."""
    if _POOL_KEY not in config.stash:
        option = config.getoption("attn_gpus", None)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if option is not None:
            pool = (parse_gpu_ids(option), "--attn-gpus")
        elif visible is not None:
            pool = (parse_visible_devices(visible), "CUDA_VISIBLE_DEVICES")
        else:
            count, how = count_gpus()
            pool = ([str(i) for i in range(count)], how)
        config.stash[_POOL_KEY] = pool
    return config.stash[_POOL_KEY]


# -- who is who --------------------------------------------------------------------------------
def is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def worker_id(config) -> Optional[str]:
    return config.workerinput.get("workerid") if is_worker(config) else None


def worker_count(config) -> int:
    """xdist workers this (controller) process starts; 0 for a serial run or inside a worker."""
    if is_worker(config) or getattr(config.option, "dist", "no") == "no":
        return 0
    count = 0
    for spec in getattr(config.option, "tx", None) or []:
        many = re.match(r"^(\d+)\*", str(spec))
        count += int(many.group(1)) if many else 1
    if count:
        return count
    numprocesses = getattr(config.option, "numprocesses", None)
    return numprocesses if isinstance(numprocesses, int) else 0


def planned_assignment(ids: list[str], workers: int) -> dict[str, str]:
    """Round robin: gw0 -> ids[0], gw1 -> ids[1], ... (what XdistHooks hands out at start)."""
    return {f"gw{i}": ids[i % len(ids)] for i in range(workers)} if ids else {}


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """torch intra-op threads per worker so that workers do not oversubscribe the CPUs."""
    return max(1, _cpus() // max(1, workers))


def serial_threads() -> int:
    """torch intra-op threads for a serial run: half the cores. torch's default takes every core, and
    OpenMP's threads spin at every barrier of the many small ops a run makes, against whatever else
    the machine runs: on the 2-core CI machine with both cores busy elsewhere, README command 1's
    suite took 58.6 s with 2 threads and 41.5 s with 1 (a user saw 116 to 213 s against 21 s)."""
    return max(1, _cpus() // 2)


def _set_torch_threads(threads: int) -> None:
    if "OMP_NUM_THREADS" in os.environ:  # an explicit OMP_NUM_THREADS wins
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it is imported
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def limit_serial_threads(config) -> None:
    """In a serial run (no xdist workers, not a worker), torch threads as serial_threads() says."""
    if not is_worker(config) and not worker_count(config):
        _set_torch_threads(serial_threads())


def jit_jobs_per_build() -> int:
    """MAX_JOBS for each JIT build (FlashInfer's ninja, torch's cpp_extension) in an xdist worker.
    Left unset, every build starts cores + 2 compilers, and a first run has several builds going at
    once, one per worker that reached a new kernel family: 8 workers could hold 144 compilers of
    1 to 2 GB each. Half the cores each keeps the machine busy with a bounded number. Measured on
    H100 machines (16 cores, -n 8), the first run of trtllm,flashinfer,torch,torch-cudnn took 270 s
    with 8, 264 and 295 s with 16 and 318 s with ninja's 18, each on a machine of its own: machines
    differ as much as these settings do."""
    return max(2, _cpus() // 2)


# -- in a worker (and a serial run) -------------------------------------------------------------
def _set_visible_devices(value: str, why: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        warnings.warn(f"pytest-attn: could not pin this process to GPU {value} ({why}): CUDA was already "
                      "initialised (a conftest or plugin used torch.cuda at import time); it keeps every GPU "
                      "it saw. Move that CUDA use into a fixture.", stacklevel=2)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = value


def pin_worker(config) -> None:
    """Called first thing in pytest_configure. In an xdist worker: take the GPU and thread count the
    controller assigned. In a serial run with --attn-gpus: see only those GPUs (the first is cuda:0)."""
    if not is_worker(config):
        if config.getoption("attn_gpus", None) is not None and not worker_count(config):
            ids, _ = gpu_pool(config)
            _set_visible_devices(",".join(ids), "--attn-gpus")
        return
    jobs = config.workerinput.get(WORKERINPUT_JIT_JOBS)
    if jobs and "MAX_JOBS" not in os.environ:  # an explicit MAX_JOBS wins
        os.environ["MAX_JOBS"] = str(jobs)
    threads = config.workerinput.get(WORKERINPUT_THREADS)
    if threads:
        _set_torch_threads(threads)
    gpu = config.workerinput.get(WORKERINPUT_GPU)
    if gpu is not None:
        _set_visible_devices(gpu, f"xdist worker {worker_id(config)}")


def poisoned_context_reason(text: str) -> Optional[str]:
    """The marker in an error text that says the CUDA context is poisoned, or None."""
    lowered = text.lower()
    return next((m for m in POISONED_CONTEXT_MARKERS if m in lowered), None)


# -- report header and summary ------------------------------------------------------------------
def header_lines(config) -> list[str]:
    workers = worker_count(config)
    if workers:
        ids, source = gpu_pool(config)
        threads = os.environ.get("OMP_NUM_THREADS") or threads_per_worker(workers)
        if not ids:
            return [f"attn workers: {workers} xdist workers, no GPU to pin (none found: {source}); "
                    f"{threads} torch thread(s) each"]
        jobs = os.environ.get("MAX_JOBS") or jit_jobs_per_build()
        plan = ", ".join(f"{w} -> GPU {g}" for w, g in planned_assignment(ids, workers).items())
        return [f"attn gpus: {plan} (round robin over {source}; each worker sees only its GPU as cuda:0; "
                f"MAX_JOBS={jobs} per JIT build)"]
    if not is_worker(config) and config.getoption("attn_gpus", None) is not None:
        return [f"attn gpus: CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')} (--attn-gpus)"]
    return []


class XdistHooks:
    """xdist hooks, registered in the controller and in every worker when xdist is loaded."""

    def __init__(self, config):
        self.config = config
        self.worker = is_worker(config)
        # controller
        self.slots: dict[str, int] = {}  # live worker id -> index into the GPU pool
        self.assigned: dict[str, str] = {}  # every worker id (replacements too) -> GPU
        self.tests_run: Counter = Counter()
        self.ending: dict[str, tuple[str, str]] = {}  # worker id -> (culprit nodeid, error marker)
        self.moved: list[tuple[str, str, str]] = []  # (test handed out again, old worker, culprit)
        # worker
        self.poisoned_by: Optional[str] = None

    # -- controller ----------------------------------------------------------------------------
    def pytest_configure_node(self, node):
        workers = worker_count(self.config) or 1
        node.workerinput[WORKERINPUT_THREADS] = threads_per_worker(workers)
        node.workerinput[WORKERINPUT_JIT_JOBS] = jit_jobs_per_build()
        ids, _ = gpu_pool(self.config)
        if not ids:
            return
        # The least used slot: round robin at start, and a replacement takes its predecessor's GPU.
        load = Counter(self.slots.values())
        slot = min(range(len(ids)), key=lambda s: (load[s], s))
        wid = node.gateway.id
        self.slots[wid] = slot
        self.assigned[wid] = node.workerinput[WORKERINPUT_GPU] = ids[slot]

    def pytest_testnodedown(self, node, error):
        wid = node.gateway.id
        self.slots.pop(wid, None)
        if error is not None and wid in self.ending:
            # Ending on purpose is not a crash: keep it out of --max-worker-restart's count
            # (xdist adds one right after this hook), so many such tests cannot stop the run.
            dsession = self.config.pluginmanager.getplugin("dsession")
            if isinstance(getattr(dsession, "_failed_nodes_count", None), int):
                dsession._failed_nodes_count -= 1

    def pytest_handlecrashitem(self, crashitem, report, sched):
        node = getattr(report, "node", None)
        wid = node.gateway.id if node is not None else None
        if wid not in self.ending:
            return None
        culprit, marker = self.ending[wid]
        try:  # the worker ended itself before starting this test: run it on a fresh worker instead
            sched.mark_test_pending(crashitem)
        except (AttributeError, NotImplementedError):  # --dist loadscope/loadfile cannot
            report.longrepr = (f"worker {wid} ended itself before starting this test, because {culprit} poisoned "
                               f"its CUDA context ({marker!r}); this --dist mode cannot hand the test to another "
                               "worker: rerun it (e.g. with --lf)")
            return True
        report.outcome = "rerun"
        report.attn_handed_out_again = True
        self.moved.append((crashitem, wid, culprit))
        return True

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report, config):
        if getattr(report, "attn_handed_out_again", False):
            return "", "", ""  # not a result; the test's real reports come from the fresh worker
        return None

    # -- both: worker properties; controller: bookkeeping ----------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        if self.worker and WORKERINPUT_GPU in self.config.workerinput:
            item.user_properties.append((WORKER_PROPERTY, worker_id(self.config)))
            item.user_properties.append((GPU_PROPERTY, self.config.workerinput[WORKERINPUT_GPU]))

    def pytest_runtest_logreport(self, report):
        node = getattr(report, "node", None)
        if self.worker or node is None:
            return
        wid = node.gateway.id
        if report.when == "teardown":
            self.tests_run[wid] += 1
        for key, value in report.user_properties:
            if key == RESTART_PROPERTY:
                self.ending[wid] = (report.nodeid, value)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if not report.failed or self.poisoned_by is not None:
            return report
        marker = poisoned_context_reason(call.excinfo.exconly() if call.excinfo is not None else report.longreprtext)
        if marker is None:
            return report
        self.poisoned_by = item.nodeid
        if self.worker:
            report.user_properties.append((RESTART_PROPERTY, marker))
            report.sections.append((
                "pytest-attn", f"the error ({marker!r}) means this process's CUDA context is poisoned: worker "
                f"{worker_id(self.config)} ends after this test and xdist starts a fresh one for the rest"))
        elif not os.environ.get("PYTEST_ATTN_ISOLATED_CHILD"):  # (isolation.CHILD_ENV: already alone)
            # a serial run cannot start afresh: later CUDA tests here may fail for this test's sake
            report.sections.append((
                "pytest-attn", f"the error ({marker!r}) means this process's CUDA context is poisoned, so later "
                "tests in this run may fail too. Run the backend with --attn-isolate=NAME, or the suite under "
                "xdist (-n N), so that only this test fails."))
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if self.worker and self.poisoned_by is not None:
            # Every report of the culprit has reached the controller (execnet writes synchronously);
            # ending now, before this test starts, lets xdist hand it to a fresh worker.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_POISONED)
        return (yield)

    def pytest_terminal_summary(self, terminalreporter):
        if self.worker or not (self.assigned or self.moved):
            return
        terminalreporter.section("pytest-attn xdist workers")
        for wid, gpu in self.assigned.items():
            terminalreporter.write_line(f"{wid}: GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu}), {self.tests_run[wid]} tests")
        for test, wid, culprit in self.moved:
            terminalreporter.write_line(f"{wid} ended after {culprit} poisoned its CUDA context "
                                        f"({self.ending[wid][1]!r}); {test} ran on a fresh worker instead")
