"""Does the benchmark harness measure what it claims? A check to run by hand on a GPU (not a test):

    python -m pytest_attn.bench.fidelity --backend flashinfer --backend torch

For the seed's shape (16 heads x 80, bf16, full mask) at seq_len 1024..8192, each backend is timed
by the harness three times (plan, first call, warm-up, timed calls: what a benchmark row does);
the three medians must agree within --tolerance percent. The harness' median is then compared with
an independent measurement of the same call: one CUDA graph holding many back-to-back calls, timed
as a whole with one event pair (per-call events and launch gaps cannot enter it), or, where the
call cannot be captured, many back-to-back eager calls between one event pair; plus
triton.testing.do_bench_cudagraph where triton is installed. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

DEFAULT_SEQ_LENS = (1024, 2048, 4096, 8192)


def independent_time_s(fn: Callable, device: str, target_s: float = 0.05) -> tuple[float, str]:
    """Per-call device time of ``fn`` measured without the harness' per-call timing."""
    import torch

    if not str(device).startswith("cuda"):
        fn()
        count, start = 0, time.perf_counter()
        while count < 5 or time.perf_counter() - start < target_s:
            fn()
            count += 1
        return (time.perf_counter() - start) / count, "wall-clock loop"
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    repeats = int(min(200, max(5, target_s * 1e3 / max(start.elapsed_time(end), 1e-3))))
    method = f"graph of {repeats} calls"
    try:
        from pytest_attn.check import cuda_graph

        graph, _ = cuda_graph.capture(fn, torch.cuda.current_device(), repeats)
        graph.replay()
        run: Callable = graph.replay
        per_run = repeats
    except Exception:
        torch.cuda.synchronize()
        method = f"{repeats} eager calls, one event pair"

        def run():
            for _ in range(repeats):
                fn()
        per_run = repeats
    samples = []
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / per_run)
    return statistics.median(samples), method


def triton_time_s(fn: Callable) -> Optional[float]:
    """triton.testing.do_bench_cudagraph's median, when triton is installed and it works."""
    try:
        import torch
        from triton.testing import do_bench_cudagraph
    except ImportError:
        return None
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            try:
                ms = do_bench_cudagraph(fn, rep=50, return_mode="median")
            except TypeError:  # older triton: no return_mode
                ms = do_bench_cudagraph(fn, rep=50)
        torch.cuda.synchronize()
        return float(ms) / 1e3
    except Exception:
        return None


def check(backend_names: Sequence[str], seq_lens: Sequence[int], device: Optional[str], repeats: int,
          tolerance_pct: float, warmup: int, iters: int, graph: str) -> int:
    from pytest_attn.bench.measure import BenchSettings, measure_backend
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS
    from pytest_attn.env import devices
    from pytest_attn.core.errors import AttnError, UnsupportedCase
    from pytest_attn.check.batch import build_batch
    from pytest_attn.env.registry import Registry

    registry = Registry.discover()
    try:
        backends = [registry.get(n) for n in backend_names]
    except AttnError as exc:
        print(f"pytest_attn.bench.fidelity: {exc}", file=sys.stderr)
        return 2
    try:
        device = devices.resolve(device, "--device")
    except AttnError as exc:
        print(f"pytest_attn.bench.fidelity: {exc}", file=sys.stderr)
        return 2
    settings = BenchSettings(warmup, iters, graph, False)
    started = time.perf_counter()
    header = (f"{'backend':>12} | {'seq_len':>7} | {'timer':>11} | " + " | ".join(f"{'run' + str(i + 1) + '_ms':>9}" for i in range(repeats))
              + f" | {'spread%':>7} | {'indep_ms':>9} | {'diff%':>6} | {'triton_ms':>9} | ok  | independent by")
    print(f"harness fidelity on {device}: seed shape {VIT_HEADS}x{VIT_HEAD_DIM} bf16 full; {repeats} harness runs of "
          f"{warmup} warm-up + {iters} timed calls; tolerance {tolerance_pct}%")
    print(header)
    print("-" * len(header))
    failures = 0
    for backend in backends:
        availability = backend.available()
        if not availability:
            print(f"{backend.name:>12} | unavailable: {availability.reason}")
            failures += 1
            continue
        for seq_len in seq_lens:
            batch = build_batch([seq_len], num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                                device=device)
            try:
                runs = [measure_backend(backend, batch, settings) for _ in range(repeats)]
            except UnsupportedCase as exc:
                print(f"{backend.name:>12} | {seq_len:>7} | unsupported: {'; '.join(exc.reasons)}")
                continue
            medians = [timing.device_median_s for _, timing, _ in runs]
            forward = runs[-1][2]
            spread = 100.0 * (max(medians) - min(medians)) / min(medians)
            independent, how = independent_time_s(forward, device)
            harness = statistics.median(medians)
            diff = 100.0 * (harness - independent) / independent
            via_triton = triton_time_s(forward) if device.startswith("cuda") else None
            ok = spread <= tolerance_pct and abs(diff) <= tolerance_pct
            failures += not ok
            print(f"{backend.name:>12} | {seq_len:>7} | {runs[0][1].method:>11} | "
                  + " | ".join(f"{m * 1e3:>9.4f}" for m in medians)
                  + f" | {spread:>7.2f} | {independent * 1e3:>9.4f} | {diff:>+6.2f} | "
                  + (f"{via_triton * 1e3:>9.4f}" if via_triton is not None else f"{'n/a':>9}")
                  + f" | {'yes' if ok else 'NO '} | {how}")
            sys.stdout.flush()
    print(f"{failures} check(s) failed; {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_attn.bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", required=True, help="a registered backend (repeatable)")
    parser.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_SEQ_LENS)), help="comma list")
    parser.add_argument("--device", default=None, help="cuda (default when available), cuda:N or cpu")
    parser.add_argument("--repeats", type=int, default=3, help="harness runs per size (default 3)")
    parser.add_argument("--tolerance", type=float, default=3.0, help="percent (default 3)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--graph", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
    return check(args.backend, seq_lens, args.device, args.repeats, args.tolerance, args.warmup, args.iters, args.graph)


if __name__ == "__main__":
    sys.exit(main())
