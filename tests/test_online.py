"""The core claim: taking the backbone out of the training loop changes nothing (float32 cache = online).

The online reference here runs the backbone through ``ModelPass`` inside the loop, the same pass the dump uses; that
this pass yields what the model's lm_head reads (so the heads are trained on the right states) is checked against a
plain ``model(ids).logits`` in tests/test_dump.py (``test_the_cached_states_are_what_lm_head_reads``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import STORIES, write_jsonl
from safetensors.torch import load_file

from medusa_cache import store
from medusa_cache.backbone import ModelPass
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.train import TrainConfig, train


@pytest.mark.slow
def test_heads_trained_from_a_float32_cache_equal_heads_trained_online(tmp_path, monkeypatch):
    from medusa_cache.demo import DEMO

    rows = [json.loads(x) for x in (DEMO / "prompts.jsonl").read_text().splitlines()[:30]]
    data = write_jsonl(tmp_path / "s.jsonl", rows)
    # one unit holding everything, so the dump runs every sequence alone and whole, as the online loop does
    run_dump(DumpConfig(model=str(STORIES), data=[str(data)], out=str(tmp_path / "c"), dtype="float32",
                        max_length=512, chunk_tokens=1024, shard_tokens=4096, forward_tokens=1))
    cfg = dict(cache=str(tmp_path / "c"), num_heads=3, epochs=2, lr=3e-3, batch_tokens=128, grad_accum=2,
               val_fraction=0, block_tokens=256, shuffle_buffer=4, seed=1)
    train(TrainConfig(out=str(tmp_path / "cached"), **cfg))

    # online: every block the trainer reads is computed by the backbone right there, inside the loop
    backbone = ModelPass(str(STORIES), "float32", "cpu")
    ids = store.Cache(tmp_path / "c").array("input_ids")
    calls = []

    def online_rows(self, start, stop, packed=False):
        seqs = [s for s in range(self.n_seqs) if self.offsets[s] >= start and self.offsets[s + 1] <= stop]
        calls.append(len(seqs))
        return torch.cat([backbone.run(ids, [(int(self.offsets[s]), int(self.offsets[s + 1]),
                                                int(self.offsets[s]))])[0] for s in seqs])

    monkeypatch.setattr(store.Cache, "read_hidden", online_rows)
    monkeypatch.setattr(store.Cache, "reads_into", lambda self: False)  # the loader reads blocks via read_hidden
    train(TrainConfig(out=str(tmp_path / "online"), **cfg))
    assert sum(calls) >= 2 * 30  # the backbone ran on every sequence in each of the 2 epochs
    a = load_file(str(tmp_path / "cached" / "medusa_lm_head.safetensors"))
    b = load_file(str(tmp_path / "online" / "medusa_lm_head.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
