"""Capturing a call in a CUDA graph, once for the whole project: graph replay (``graph_replay``),
device timing (``bench.timing``) and the harness's self-check (``bench.fidelity``) capture this way."""
from __future__ import annotations

from typing import Any, Callable


def capture(fn: Callable[[], Any], device, calls: int = 1) -> tuple[Any, Any]:
    """``(graph, output of the last captured call)``: ``calls`` back-to-back calls of ``fn`` in one
    CUDA graph, after a warm call on a side stream (JIT loads and lazy allocations happen outside
    the capture, as torch's CUDA-graph documentation advises). Raises what the capture raises."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    torch.cuda.synchronize(device)
    return graph, out
