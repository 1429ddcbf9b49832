"""Does the eager drift fall on every host-bound call alike? On a GPU machine:

    python tests/evidence/host_speed_probe.py --out FILE.json [--turns 1500] [--chunk 100]

Samples, in turn (A B C D, D C B A, ...: bench.timing.interleaved_eager_samples), the eager wall
time of: flashinfer and torch SDPA on the host-bound ViT row (256 tokens), and two fixed host
workloads: eight tiny CUDA adds (a launch loop) and a pure-Python loop. Each sample lasts about
5 ms. Per chunk of turns it prints each workload's median, and the steal time and mean CPU clock the
kernel reports; at the end, max/min of the chunk medians, raw and divided sample by sample by each
fixed workload. If the ratios stay flat where the raw medians drift, a reference measured in turn
cancels the drift. Writes every sample to FILE.json.
"""
import argparse
import json
import statistics
import time


def read_steal():
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return int(fields[7]) if len(fields) > 7 else 0


def mean_mhz():
    try:
        with open("/proc/cpuinfo") as f:
            values = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return statistics.mean(values) if values else float("nan")
    except OSError:
        return float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--turns", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--sample-ms", type=float, default=5.0)
    args = parser.parse_args()

    import torch

    from pytest_attn.bench.ab import vit_batch
    from pytest_attn.bench.measure import BenchSettings, measure_backend
    from pytest_attn.bench.timing import interleaved_eager_samples
    from pytest_attn.env.registry import Registry

    registry = Registry.discover()
    batch = vit_batch(256, "cuda:0")
    quick = BenchSettings(5, 5, "off", False)
    work = {}
    for name in ("flashinfer", "torch"):
        _, _, forward = measure_backend(registry.get(name), batch, quick)
        work[name] = forward
    a = torch.ones(16, device="cuda:0")
    c = torch.empty_like(a)

    def launch_loop():
        for _ in range(8):
            torch.add(a, a, out=c)

    def python_loop():
        total = 0
        for i in range(3000):
            total += i
        return total

    work["ref-launch"] = launch_loop
    work["ref-python"] = python_loop
    calls = {}
    for name, fn in work.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        per_call = (time.perf_counter() - start) / 50
        calls[name] = (fn, max(1, round(args.sample_ms * 1e-3 / per_call)))
    print("calls per sample", {k: v[1] for k, v in calls.items()}, flush=True)
    samples = {name: [] for name in work}
    chunks = []
    started = time.perf_counter()
    for index in range(0, args.turns, args.chunk):
        steal, t0 = read_steal(), time.perf_counter()
        got = interleaved_eager_samples(calls, args.chunk, "cuda:0")
        elapsed = time.perf_counter() - t0
        chunk = {"t": t0 - started, "steal_ticks": read_steal() - steal, "seconds": elapsed, "mhz": mean_mhz(),
                 **{name: statistics.median(s) for name, s in got.items()}}
        chunks.append(chunk)
        for name, s in got.items():
            samples[name].extend(s)
        print(f"t {chunk['t']:6.1f}s steal {chunk['steal_ticks']:4d} MHz {chunk['mhz']:7.1f} | "
              + " ".join(f"{name} {chunk[name] * 1e6:8.2f}us" for name in work), flush=True)

    def chunked(values):
        return [statistics.median(values[i:i + args.chunk]) for i in range(0, len(values), args.chunk)]

    summary = {}
    for name in ("flashinfer", "torch"):
        raw = chunked(samples[name])
        summary[name] = {"raw max/min": max(raw) / min(raw)}
        for ref in ("ref-launch", "ref-python"):
            rel = chunked([x / r for x, r in zip(samples[name], samples[ref])])
            summary[name][f"/{ref} max/min"] = max(rel) / min(rel)
    for ref in ("ref-launch", "ref-python"):
        raw = chunked(samples[ref])
        summary[ref] = {"raw max/min": max(raw) / min(raw)}
    for name, figures in summary.items():
        print(f"{name:12} " + " | ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    medians = {name: statistics.median(s) for name, s in samples.items()}
    print("whole-run medians us:", {k: round(v * 1e6, 2) for k, v in medians.items()},
          "| flashinfer/ref-launch", round(statistics.median(
              x / r for x, r in zip(samples["flashinfer"], samples["ref-launch"])), 4),
          "| flashinfer/ref-python", round(statistics.median(
              x / r for x, r in zip(samples["flashinfer"], samples["ref-python"])), 4))
    with open(args.out, "w") as f:
        json.dump({"calls_per_sample": {k: v[1] for k, v in calls.items()}, "chunks": chunks, "samples": samples,
                   "summary": summary, "gpu": torch.cuda.get_device_name(0)}, f)


if __name__ == "__main__":
    main()
