"""Backends that try to look fast without doing the work, and planted slowdowns, for the timing
tests and the GPU evidence script (tests/evidence/gate_evidence.py). Each games the timer one way:

- CachesOutput: computes on the first call, then returns the buffer untouched (no work timed).
- CopiesCachedOutput: computes once, then copies its saved result into ``out`` (times a copy).
- FinishesLater: returns at once and writes ``out`` from a thread afterwards (work past the timed region).
- SideStream (CUDA): runs the attention on a side stream the caller's stream never waits for.
- WritesNaN: fills ``out`` with NaN on every call (a fast kernel that computes nothing; the check
  after the timed calls compares only finite values, so the first output must be finite).

and the planted slowdowns the gate must catch:

- SlowDevice(fraction): an extra device kernel (a matmul) sized to ``fraction`` of the call.
- SlowHost(fraction): a calibrated busy-wait on the host, ``fraction`` of the call, before launching.
"""
from __future__ import annotations

import threading
import time

import torch

from pytest_attn_backends.torch_sdpa import TorchSDPABackend


class CachesOutput(TorchSDPABackend):
    def __init__(self, name="caches-output"):
        super().__init__(name=name)
        self.calls = 0

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        self.calls += 1
        if self.calls <= 1:
            return super().forward(q, k, v, metadata, plan, out=out)
        return out  # "already computed"


class WritesNaN(TorchSDPABackend):
    def __init__(self, name="writes-nan"):
        super().__init__(name=name)

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        out.fill_(float("nan"))
        return out


class CopiesCachedOutput(TorchSDPABackend):
    def __init__(self, name="copies-cached"):
        super().__init__(name=name)
        self.saved = None

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        if self.saved is None:
            self.saved = super().forward(q, k, v, metadata, plan, out=out).clone()
        out.copy_(self.saved)
        return out


class FinishesLater(TorchSDPABackend):
    def __init__(self, name="finishes-later", delay_s=0.05):
        super().__init__(name=name)
        self.delay_s = delay_s
        self.first = True
        self.threads: list[threading.Thread] = []

    def wait(self) -> None:
        """Join the late work and restore SDPA's kernel choice: it is process-wide and torch's
        sdpa_kernel() is not thread-safe, so the late thread, entering it while the timed thread was
        inside, restores the timed thread's narrowed choice on exit and would leave it to later tests."""
        import torch

        for thread in self.threads:
            thread.join()
        self.threads.clear()
        for enable in ("math", "flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{enable}_sdp")(True)

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        if self.first:  # the contract check's call: honest, so only the timed calls game
            self.first = False
            return super().forward(q, k, v, metadata, plan, out=out)

        def later():
            time.sleep(self.delay_s)
            TorchSDPABackend.forward(self, q, k, v, metadata, plan, out=out)

        thread = threading.Thread(target=later, daemon=True)
        self.threads.append(thread)
        thread.start()
        return out


class SideStream(TorchSDPABackend):
    """CUDA only: the work goes on a side stream; the current stream never waits for it."""

    def __init__(self, name="side-stream"):
        super().__init__(name=name)
        self.stream = None
        self.first = True

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        if self.first:
            self.first = False
            return super().forward(q, k, v, metadata, plan, out=out)
        if self.stream is None:
            self.stream = torch.cuda.Stream(q.device)
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(2_000_000)  # ~1 ms of spinning first, so the race is not won by luck
            super().forward(q, k, v, metadata, plan, out=out)
        return out


class SlowDevice(TorchSDPABackend):
    """torch SDPA plus an extra device kernel sized to ``fraction`` of the call (calibrate())."""

    def __init__(self, name="slow-device", fraction=0.05):
        super().__init__(name=name)
        self.fraction = fraction
        self.extra = None  # (a, b): the matmul operands

    def calibrate(self, call_s: float, device) -> None:
        """Size the square matmul so that it costs ``fraction * call_s`` on ``device``."""
        from pytest_attn.bench.timing import measure_call

        n = 64
        while True:
            a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
            t = statistics_median(measure_call(lambda: a @ a, device=device, warmup=3, iters=10, graph="off").device_s)
            if t >= self.fraction * call_s or n >= 16384:
                break
            n = int(n * 1.25) + 8
        # scale the last step's cost linearly by flops to land on the fraction
        target = self.fraction * call_s
        n = max(16, int(n * (target / t) ** (1 / 3)))
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        self.extra = (a, torch.empty_like(a))

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        result = super().forward(q, k, v, metadata, plan, out=out)
        if self.extra is not None:
            a, c = self.extra
            torch.matmul(a, a, out=c)
        return result


class SlowHost(TorchSDPABackend):
    """torch SDPA after a busy-wait of ``fraction * call_s`` on the host (calibrate())."""

    def __init__(self, name="slow-host", fraction=0.10):
        super().__init__(name=name)
        self.fraction = fraction
        self.wait_s = 0.0

    def calibrate(self, call_s: float, device=None) -> None:
        self.wait_s = self.fraction * call_s

    def forward(self, q, k, v, metadata, plan, out=None, lse=None):
        if self.wait_s:
            end = time.perf_counter() + self.wait_s
            while time.perf_counter() < end:
                pass
        return super().forward(q, k, v, metadata, plan, out=out)


def statistics_median(values):
    import statistics

    return statistics.median(values)
