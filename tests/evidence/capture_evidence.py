"""GPU evidence for pytest_attn.capture: a small engine on FlashInfer's paged API is recorded, and
what was recorded is replayed through pytest-attn.

    python tests/evidence/capture_evidence.py --out /tmp/capture-evidence

The engine (3 layers, 8 query / 2 KV heads, head_dim 128, bf16, pages of 16, NHD) prefills three
prompts with BatchPrefillWithPagedKVCacheWrapper, then decodes four tokens with
BatchDecodeWithPagedKVCacheWrapper, writing its K/V into its own paged cache; it checks its own
outputs against a float32 softmax so that the calls recorded are calls that computed attention.
The recording is then replayed: through ``pytest pytest_attn/suite --attn-backend=flashinfer
--attn-case-file`` when that option exists, else case by case through run_case (flashinfer and
torch). The last line is the summary; the exit status is 0 only when every replayed case passed and
the recording holds the engine's prefill and decode batches.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

LAYERS, HEADS, KV_HEADS, HEAD_DIM, PAGE = 3, 8, 2, 128, 16
PROMPTS = (37, 100, 5)
DECODE_STEPS = 4


class PagedEngine:
    def __init__(self, device="cuda"):
        import flashinfer

        self.device = device
        pages = sum(-(-(n + DECODE_STEPS) // PAGE) for n in PROMPTS) + 1
        shape = (pages, PAGE, KV_HEADS, HEAD_DIM)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(LAYERS)]
        self.v = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(LAYERS)]
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        # fa2: the fa3 kernels of "auto" on Hopper take ~100 s to build (docs/measured.md)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        self.tables, next_page = [], 0
        for n in PROMPTS:
            count = -(-(n + DECODE_STEPS) // PAGE)
            self.tables.append(list(range(next_page, next_page + count)))
            next_page += count
        self.lens = [0] * len(PROMPTS)
        self.history = [[([], []) for _ in PROMPTS] for _ in range(LAYERS)]  # per layer, request: K, V chunks
        self.max_error = 0.0

    def _write(self, layer, rid, k, v):
        start = self.lens[rid]
        for i in range(k.shape[0]):
            page, slot = self.tables[rid][(start + i) // PAGE], (start + i) % PAGE
            self.k[layer][page, slot], self.v[layer][page, slot] = k[i], v[i]
        self.history[layer][rid][0].append(k)
        self.history[layer][rid][1].append(v)

    def _indices(self, kv_lens):
        i32 = dict(dtype=torch.int32, device=self.device)
        pages = [-(-n // PAGE) for n in kv_lens]
        indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0).tolist()), **i32)
        indices = torch.tensor([p for rid, n in enumerate(pages) for p in self.tables[rid][:n]], **i32)
        last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(kv_lens, pages)], **i32)
        return indptr, indices, last

    def _check(self, layer, out, new_lens):
        """The engine's own output against a float32 softmax over each request's history."""
        row = 0
        for rid, n in enumerate(new_lens):
            k = torch.cat(self.history[layer][rid][0]).float().repeat_interleave(HEADS // KV_HEADS, 1)
            v = torch.cat(self.history[layer][rid][1]).float().repeat_interleave(HEADS // KV_HEADS, 1)
            q = self._q[row:row + n].float()
            scores = torch.einsum("qhd,khd->hqk", q, k) * HEAD_DIM ** -0.5
            lq, lk = n, k.shape[0]
            visible = torch.arange(lk, device=self.device)[None] <= torch.arange(lk - lq, lk, device=self.device)[:, None]
            ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
            self.max_error = max(self.max_error, float((out[row:row + n].float() - ref).abs().max()))
            row += n

    def step(self, new_lens, wrapper, plan_args):
        kv_lens = [self.lens[r] + n for r, n in enumerate(new_lens)]
        indptr, indices, last = self._indices(kv_lens)
        if wrapper is self.prefill:
            qo = torch.tensor([0] + list(torch.tensor(new_lens).cumsum(0).tolist()), dtype=torch.int32,
                              device=self.device)
            wrapper.plan(qo, indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, PAGE, causal=True, **plan_args)
        else:
            wrapper.plan(indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, PAGE, **plan_args)
        total = sum(new_lens)
        for layer in range(LAYERS):
            k = torch.randn(total, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
            v = torch.randn(total, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
            row = 0
            for rid, n in enumerate(new_lens):
                self._write(layer, rid, k[row:row + n], v[row:row + n])
                row += n
            self._q = torch.randn(total, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=self.device)
            out = wrapper.run(self._q, (self.k[layer], self.v[layer]))
            self._check(layer, out, new_lens)
        self.lens = kv_lens

    def run(self):
        self.step(list(PROMPTS), self.prefill, dict(q_data_type=torch.bfloat16))
        for _ in range(DECODE_STEPS):
            self.step([1] * len(PROMPTS), self.decode, dict(q_data_type=torch.bfloat16))


def replay_with_the_case_file_option(path: Path) -> tuple[bool, str]:
    """(whether the option exists, the run's summary line)."""
    command = [sys.executable, "-m", "pytest", "pytest_attn/suite", "--attn-backend=flashinfer",
               f"--attn-case-file={path}", "--attn-cases=captured", "-q", "-p", "no:randomly"]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode == 4 and "attn-case-file" in output:
        print("--attn-case-file is not available here:", output.strip().splitlines()[-1])
        return False, ""
    print(output[-4000:])
    return True, f"pytest exit {done.returncode}: {output.strip().splitlines()[-1]}"


def replay_case_by_case(cases) -> tuple[int, str]:
    from pytest_attn.check.harness import assert_case_passes, run_case
    from pytest_attn.core.errors import AttnCheckFailure, UnsupportedCase
    from pytest_attn.env.registry import Registry

    registry, failed, counts = Registry.discover(), 0, []
    for name in ("flashinfer", "torch"):
        backend = registry.get(name)
        passed = unsupported = 0
        for case in cases:
            try:
                assert_case_passes(run_case(backend, case, device="cuda", seed=0), backend, case)
                passed += 1
                verdict = "PASS"
            except UnsupportedCase as exc:
                unsupported += 1
                verdict = f"UNSUPPORTED ({'; '.join(exc.reasons)})"
            except AttnCheckFailure as exc:
                failed += 1
                verdict = f"FAIL ({exc.summary})"
            print(f"  {name:10s} {case.name}: {case.describe()}: {verdict}")
        counts.append(f"{name}: {passed} passed, {unsupported} unsupported")
    return failed, "; ".join(counts) + f"; {failed} failed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("capture-evidence"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "captured.jsonl"

    from pytest_attn import capture

    engine = PagedEngine()
    with capture.record(path) as recording:
        engine.run()
    print(recording.summary())
    print(f"engine's own outputs against float32: max abs error {engine.max_error:.3g}")
    cases = capture.load(path)
    kinds = sorted({case.tags[-1] for case in cases})
    expected_calls = LAYERS * (1 + DECODE_STEPS)
    ok = recording.calls == expected_calls and kinds == ["decode", "prefill"] and engine.max_error < 0.05
    exists, line = replay_with_the_case_file_option(path)
    if not exists:
        failed, line = replay_case_by_case(cases)
        ok = ok and not failed
    else:
        ok = ok and line.startswith("pytest exit 0")
    print(f"capture evidence: {len(cases)} cases ({', '.join(kinds)}) from {recording.calls} calls "
          f"(expected {expected_calls}); replay: {line}; {'OK' if ok else 'NOT OK'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
