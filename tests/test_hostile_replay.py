"""Hostile CUDA-graph replay, its decision logic on CPU (a 'replay' there calls the decoder again):
NaN in the output before every replay and in the padded query rows, a batch captured padded past its
live requests, another batch planned and run between each plan and its replay. A correct planted
decoder passes; one that keeps its plan in a workspace the backend's next plan overwrites
(flashinfer #5176), one that reads padded rows as data, and one holding a wrapper not built for
graphs (flashinfer #3904, refused before the capture, with the reason) fail."""
import dataclasses

import pytest
import torch
from planted_backends import Einsum, attend

from pytest_attn.check.graph_replay import (SCENARIOS, GraphScenario, capture_refusal, padding_value,
                                            run_graph_decode)
from pytest_attn.core.errors import AttnCheckFailure

PLAIN = GraphScenario("cpu-plain", 8, 2, 64, prompts=(33, 17, 20), steps=4, finish_after=2)
HOSTILE = dataclasses.replace(PLAIN, name="cpu-hostile", pad_to=6, hostile=True)
WORKSPACE = {}  # shared by a planted backend's plans and its graph decoder's, as a FlashInfer workspace is


class TableDecoder:
    """A correct graph decoder: plan() writes block tables and lengths into fixed tensors in place,
    run() reads them; padded rows read one token of page 0 and are never used."""

    def __init__(self, manager, layer, max_batch):
        self.manager, self.layer, self.max_batch = manager, layer, max_batch
        self.tables = torch.zeros((max_batch, manager.num_pages), dtype=torch.long)
        self.lens = torch.ones(max_batch, dtype=torch.long)
        self.live = 0

    def plan(self, metadata):
        tables, lens = self.buffers()
        tables.zero_()
        lens.fill_(1)
        for i in range(metadata.num_requests):
            pages = metadata.block_tables[i]
            tables[i, : len(pages)] = torch.tensor(pages)
            lens[i] = metadata.kv_lens[i]
        self.live = metadata.num_requests
        return "planned"

    def buffers(self):
        return self.tables, self.lens

    def run(self, q, out):
        tables, lens = self.buffers()
        for i in range(self.max_batch):
            n = int(lens[i])
            pages = [int(p) % self.manager.num_pages for p in tables[i]]  # a kernel reads what it is pointed at
            k, v = self.manager.gather(self.layer.layer_idx, pages, n)
            out[i:i + 1] = attend(q[i:i + 1], k.to(q.dtype), v.to(q.dtype), self.layer, True)[0]


class OffersTableDecoder(Einsum):
    name = "table-decoder"
    decoder_type = TableDecoder

    def graph_decoder(self, manager, layer, max_batch, device):
        return self.decoder_type(manager, layer, max_batch)


class WorkspaceDecoder(TableDecoder):
    """Keeps its plan in the backend's shared workspace: the next plan of anything overwrites it."""

    def buffers(self):
        if WORKSPACE.get("shape") != (self.max_batch, self.manager.num_pages):
            WORKSPACE.update(shape=(self.max_batch, self.manager.num_pages), tables=self.tables.clone(),
                             lens=self.lens.clone())
        return WORKSPACE["tables"], WORKSPACE["lens"]


class SharesWorkspace(OffersTableDecoder):
    name = "shares-workspace"
    decoder_type = WorkspaceDecoder

    def plan(self, metadata, layer, device="cpu"):
        if "tables" in WORKSPACE and metadata.has_cache:  # its eager plans write the same workspace
            WORKSPACE["tables"].zero_()
            for i, pages in enumerate(metadata.block_tables[: WORKSPACE["tables"].shape[0]]):
                WORKSPACE["tables"][i, : len(pages)] = torch.tensor(pages)
        return super().plan(metadata, layer, device)


class PaddingDecoder(TableDecoder):
    """Lets the padded query rows into the live rows (a reduction over the whole padded batch)."""

    def run(self, q, out):
        super().run(q, out)
        out[: self.live] += q[self.live:].float().sum().to(q.dtype) * 0


class ReadsPadding(OffersTableDecoder):
    name = "reads-padding"
    decoder_type = PaddingDecoder


class NotForGraphs(TableDecoder):
    def __init__(self, manager, layer, max_batch):
        super().__init__(manager, layer, max_batch)
        self.wrapper = type("BatchDecodeWithPagedKVCacheWrapper", (), {"is_cuda_graph_enabled": False})()


class HoldsEagerWrapper(OffersTableDecoder):
    name = "eager-wrapper"
    decoder_type = NotForGraphs


def failures(backend, scenario):
    WORKSPACE.clear()
    return [f"{r.kind} {r.step}: {r.comparison.summary()}" for r in run_graph_decode(backend, scenario, device="cpu")
            if not r.passed]


def test_the_hostile_scenarios_pad_past_the_live_batch_and_interleave():
    hostile = [s for s in SCENARIOS.values() if s.hostile]
    assert hostile and all(s.max_batch > len(s.prompts) for s in hostile)
    assert padding_value(HOSTILE) != padding_value(HOSTILE)  # NaN
    assert padding_value(PLAIN) == 0.0


def test_a_correct_decoder_passes_plain_and_hostile_replay():
    assert failures(OffersTableDecoder(), PLAIN) == []
    replays = run_graph_decode(OffersTableDecoder(), HOSTILE, device="cpu")
    assert all(r.passed for r in replays)
    kinds = [r.kind for r in replays]
    assert kinds.count("eager between plan and replay") == HOSTILE.steps + 1 and kinds.count("replay") == HOSTILE.steps + 1  # and the prefill


def test_a_plan_kept_in_a_shared_workspace_fails_only_when_another_plan_comes_between():
    assert failures(SharesWorkspace(), PLAIN) == []
    bad = failures(SharesWorkspace(), HOSTILE)
    assert bad and all(line.startswith("replay") for line in bad), bad


def test_padded_rows_read_as_data_fail_only_when_the_padding_is_nan():
    assert failures(ReadsPadding(), PLAIN) == []
    bad = failures(ReadsPadding(), HOSTILE)
    assert bad and "NaN" in bad[0], bad


def test_a_wrapper_not_built_for_graphs_is_refused_with_the_reason():
    with pytest.raises(AttnCheckFailure, match=r"eager-wrapper: graph capture refused: its wrapper "
                                               r"\(BatchDecodeWithPagedKVCacheWrapper\) was not built for CUDA graphs"):
        run_graph_decode(HoldsEagerWrapper(), PLAIN, device="cpu")


def test_capture_refusal_reads_the_decoder_or_its_own_word():
    class Says:
        def graph_refusal(self):
            return "needs a static page table"

    assert capture_refusal(Says()) == "needs a static page table"
    assert capture_refusal(type("D", (), {})()) is None
    ok = type("W", (), {"is_cuda_graph_enabled": True})()
    holder = type("D", (), {})()
    holder.wrapper = ok
    assert capture_refusal(holder) is None


def test_a_traced_replay_on_cpu_calls_the_decoder_again():
    """Off a GPU the stand-in replay calls run() again: both traces hold its einsum operators, and
    compare_replay (which reads CUDA kernels) is not asked on CPU."""
    from pytest_attn.check.graph_replay import trace_graph_decode

    WORKSPACE.clear()
    eager, replay, plan = trace_graph_decode(OffersTableDecoder(), PLAIN, device="cpu")
    assert plan == "planned"
    assert eager.counts().get("aten::einsum") and eager.counts() == replay.counts()
