"""Where does eager noise come from? The host-bound ViT row (256 tokens) of a backend (default
flashinfer), measure_row 8 times per condition in one process, the conditions alternating: the
process on every CPU (default) or pinned to one core (thread migration as a source). Prints each
measurement's eager median and IQR/median, and the device median. On a GPU machine:

    python tests/evidence/eager_probe.py [BACKEND]
"""
import gc, os, statistics, sys, time
from pytest_attn.bench.ab import measure_row, vit_batch
from pytest_attn.bench.measure import BenchSettings
from pytest_attn.bench.measure import spread
from pytest_attn.env.registry import Registry

backend = Registry.discover().get(sys.argv[1] if len(sys.argv) > 1 else "flashinfer")
batch = vit_batch(256, "cuda:0")
settings = BenchSettings(10, 50, "auto", False)
all_cpus = os.sched_getaffinity(0)
print("cpus", len(all_cpus), "load", os.getloadavg())
conditions = {"default": lambda: os.sched_setaffinity(0, all_cpus),
              "pinned": lambda: os.sched_setaffinity(0, {sorted(all_cpus)[2]})}
res = {k: [] for k in conditions}
measure_row(backend, batch, settings)
t0 = time.time()
for rep in range(8):
    for name, setup in (conditions.items() if rep % 2 == 0 else reversed(conditions.items())):
        setup()
        r = measure_row(backend, batch, settings)
        res[name].append((statistics.median(r["eager"]), spread(r["eager"]), statistics.median(r["device"])))
os.sched_setaffinity(0, all_cpus)
for name, rows in res.items():
    meds = [m for m, _, _ in rows]
    print(f"{name:8} eager medians ms {' '.join(f'{m*1e3:.3f}' for m in meds)} | max/min {max(meds)/min(meds):.3f} "
          f"| IQR/median {' '.join(f'{s:.2f}' for _, s, _ in rows)} | device {statistics.median(d for *_, d in rows)*1e3:.4f}")
print(f"{time.time()-t0:.0f} s")
