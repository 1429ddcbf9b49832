"""One round of one side of ``pytest-attn ab``, in its own process: time a backend on the ViT
table's rows and print ``{"rows": {label: {regime: [seconds, ...]}}, "machine": {...}}`` as JSON on
the last line of stdout.

Run as a file (``python .../ab_worker.py``) so that it works in another environment, or on a commit
checked out elsewhere: with $PYTEST_ATTN_AB_SOURCE set to a checkout, pytest_attn and the built-in
backends (its ``backends/`` folder, installed as pytest_attn_backends) are imported from there.
It uses only measure_backend, build_batch and the registry, which older commits have too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

SOURCE_ENV = "PYTEST_ATTN_AB_SOURCE"


def _use_source(root: str) -> None:
    import importlib.util

    sys.path.insert(0, root)
    backends = os.path.join(root, "backends")
    if os.path.isfile(os.path.join(backends, "__init__.py")):
        spec = importlib.util.spec_from_file_location("pytest_attn_backends", os.path.join(backends, "__init__.py"),
                                                      submodule_search_locations=[backends])
        module = importlib.util.module_from_spec(spec)
        sys.modules["pytest_attn_backends"] = module
        spec.loader.exec_module(module)


def machine_info(device: str) -> dict:
    try:
        from pytest_attn.bench.machine import attn_machine_info
    except ImportError:  # a commit from before bench.machine: torch and the GPU are what it can say
        import torch

        gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
        return {"attn": {"device": device, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda}}
    return {"attn": attn_machine_info(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--seq-lens", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--graph", default="auto")
    args = parser.parse_args(argv)
    if os.environ.get(SOURCE_ENV):
        _use_source(os.environ[SOURCE_ENV])
    from pytest_attn.bench.measure import BenchSettings, measure_backend
    from pytest_attn.cases.case import VIT_HEAD_DIM, VIT_HEADS
    from pytest_attn.check.batch import build_batch
    from pytest_attn.env.registry import Registry

    backend = Registry.discover().get(args.backend)
    settings = BenchSettings(args.warmup, args.iters, args.graph, False)
    rows = {}
    for seq_len in (int(n) for n in args.seq_lens.split(",")):
        batch = build_batch([seq_len], num_heads=VIT_HEADS, head_dim=VIT_HEAD_DIM, dtype="bfloat16", mask="full",
                            device=args.device)
        _, timing, _ = measure_backend(backend, batch, settings)
        rows[f"vit-table seq {seq_len}"] = {"device": list(timing.device_s), "eager": list(timing.samples("eager")),
                                            # bench.timing.HOST_REFERENCE, spelled out: an older commit has no such name (nor the samples)
                                            **({"host-reference": list(timing.host_reference_s)}
                                               if getattr(timing, "host_reference_s", None) else {})}
    import pytest_attn.bench.measure as measure_module

    source = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(measure_module.__file__))))
    print(json.dumps({"rows": rows, "machine": machine_info(args.device), "source": source}))
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a file: its folder's modules must not shadow top-level ones
    sys.exit(main())
