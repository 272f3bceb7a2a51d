"""`dump --keep-rows needed --max-heads K`: hidden rows only where a head (or eval) with up to K heads reads them.

The spec: row t is stored when any token t-K+1 .. t+K+1 of its own sequence is an assistant token. A store with only
those rows trains, validates, distills and evaluates exactly as the store with every row, for up to K heads; more
heads are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import killed_copy, sharegpt_slice, write_jsonl

from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.evaluate import EvalConfig, head_ranks, run_eval
from medusa_cache.heads import MedusaHeads
from medusa_cache.headsdir import load_heads
from medusa_cache.info import inspect_store
from medusa_cache.store import Cache, chunk_key, from_arrays, needed_rows
from medusa_cache.train import TrainConfig, train
from medusa_cache.verify import verify

K = 3


def test_needed_rows_is_the_window_around_assistant_tokens():
    #            seq 0: 12 tokens, assistant at 6..7        | seq 1: 4 tokens, assistant at 0
    mask = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0] + [1, 0, 0, 0])
    offsets = np.array([0, 12, 16])
    got = needed_rows(mask, offsets, max_heads=2)
    # seq 0: rows 3..5 feed heads/eval at 6..7 (t+1..t+K+1), rows 6..8 hold the base model's choice after a
    # scored position (t+1..t+K); seq 1: row 12 itself (t-K+1..t) and row 13 (t-1), never rows of seq 0
    want = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0] + [1, 1, 0, 0], dtype=bool)
    assert np.array_equal(got, want)
    # the window never crosses into the neighbouring sequence, on either side
    mask = np.array([0, 0, 0, 1] + [0, 0, 0, 0] + [1, 0, 0, 0])
    got = needed_rows(mask, np.array([0, 4, 8, 12]), max_heads=2)
    assert got.tolist() == [1, 1, 1, 1] + [0, 0, 0, 0] + [1, 1, 0, 0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, dumped):
    """The same states stored twice: every row, and only the rows needed by up to K heads."""
    d = tmp_path_factory.mktemp("keep")
    src = Cache(dumped)
    hidden = src.read_hidden(0, src.n_tokens)
    arrays = dict(offsets=src.offsets, labels=src.array("labels"), mapping=src.mapping(),
                  input_ids=src.array("input_ids"), loss_mask=src.array("loss_mask"),
                  attrs={"fingerprints": src.meta.fingerprints})
    kept = needed_rows(src.array("loss_mask"), src.offsets, K)
    from_arrays(d / "all", hidden, **arrays)
    from_arrays(d / "needed", hidden, row_kept=kept, max_heads=K, **arrays)
    return d


def test_a_needed_rows_store_trains_distills_and_evaluates_like_the_full_one(pair, tiny_llama, tmp_path):
    full, needed = Cache(pair / "all"), Cache(pair / "needed")
    assert needed.n_rows < 0.8 * full.n_rows and needed.disk_bytes() < full.disk_bytes()
    outs = {}
    for name in ("all", "needed"):
        for mode in ({"in_memory": True}, {"batch_tokens": 256, "distill": str(tiny_llama)}):
            out = tmp_path / f"{name}-{len(outs)}"
            r = train(TrainConfig(cache=str(pair / name), out=str(out), num_heads=K, epochs=1, lr=1e-3, seed=3,
                                  **mode))
            outs[name, tuple(mode)] = (out, r)
    for mode in ({"in_memory": True}, {"batch_tokens": 256, "distill": str(tiny_llama)}):
        (a, ra), (b, rb) = outs["all", tuple(mode)], outs["needed", tuple(mode)]
        ha, hb = load_heads(a)[0], load_heads(b)[0]
        for (n, x), (_, y) in zip(ha.state_dict().items(), hb.state_dict().items(), strict=True):
            assert torch.equal(x, y), (mode, n)
        assert ra["val_top1"] == rb["val_top1"]
    heads = MedusaHeads(full.hidden_size, full.meta.draft_vocab_size, K, 1, seed=1)
    # eval --targets base reads rows t+1..t+K: a base lm_head whose greedy choice is always a draft token, and ranks
    # over the whole draft vocabulary, so that any row read differently changes a rank
    base = torch.zeros(full.meta.vocab_size, full.hidden_size)
    base[torch.from_numpy(full.mapping().draft_to_target)] = torch.randn(full.meta.draft_vocab_size, full.hidden_size)
    for lm in (None, base):
        ra = head_ranks(heads, full, full.usable_seqs(), topk=full.meta.draft_vocab_size, base_lm_head=lm)
        rb = head_ranks(heads, needed, needed.usable_seqs(), topk=full.meta.draft_vocab_size, base_lm_head=lm)
        assert (ra["rank"] >= 0).mean() > 0.5
        assert all(np.array_equal(ra[k], rb[k]) for k in ra)


def test_more_heads_than_the_stored_reach_are_refused_by_name(pair, tmp_path):
    with pytest.raises(UserError, match=f"--num-heads {K + 1}: .* at most {K} heads"):
        train(TrainConfig(cache=str(pair / "needed"), out=str(tmp_path / "h"), num_heads=K + 1, epochs=1))
    assert not (tmp_path / "h").exists()
    train(TrainConfig(cache=str(pair / "all"), out=str(tmp_path / "h5"), num_heads=K + 1, max_steps=1))
    with pytest.raises(UserError, match=f"num_heads {K + 1}: .* at most {K} heads"):
        run_eval(EvalConfig(str(tmp_path / "h5"), str(pair / "needed")))
    from medusa_cache.ablate import AblateConfig, check_request

    with pytest.raises(UserError, match=f"--heads {K + 1}"):
        check_request(TrainConfig(cache=str(pair / "needed"), out=str(tmp_path / "a")),
                      AblateConfig([2, K + 1], [1], [1e-3], []))


@pytest.fixture(scope="module")
def dumped_needed(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("keepdump")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(40))
    common = dict(model=str(tiny_llama), data=[str(data)], draft_vocab_size=300, dtype="float32", max_length=256,
                  chunk_tokens=64, shard_tokens=256, forward_tokens=1)
    run_dump(DumpConfig(out=str(d / "all"), **common))
    needed = dict(common, keep_rows="needed", max_heads=K, hidden_codec="int8", int8_group=16)
    run_dump(DumpConfig(out=str(d / "needed"), **needed))
    return d, needed


def test_dump_keeps_the_needed_rows_of_the_model_run(dumped_needed, tiny_llama):
    d, _ = dumped_needed
    full, needed = Cache(d / "all"), Cache(d / "needed")
    assert needed.meta.keep_rows == "needed" and needed.meta.max_heads == K
    assert np.array_equal(needed.row_kept, needed_rows(full.array("loss_mask"), full.offsets, K))
    x, y = full.read_hidden(0, full.n_tokens), needed.read_hidden(0, needed.n_tokens)
    keep = torch.from_numpy(needed.row_kept)
    assert ((y[keep] - x[keep]).norm() / x[keep].norm()) < 0.01  # int8, and units cut at other tokens
    assert (y[~keep] == 0).all()
    assert needed.meta.counts["stored_rows"] == needed.n_rows == int(keep.sum()) < full.n_tokens
    r = verify(str(d / "needed"), deep=True, model=str(tiny_llama))
    assert r["healthy"], r["problems"]
    assert "rows for up to 3 heads" in inspect_store(str(d / "needed"))["keep_rows"]


def test_a_killed_needed_rows_dump_resumes_bit_identical(dumped_needed, tmp_path):
    d, needed = dumped_needed
    part = killed_copy(d / "needed", tmp_path / "part", (0, 3))
    assert len(Cache(part).usable_seqs(allow_partial=True)) < Cache(part).n_seqs
    run_dump(DumpConfig(**{**needed, "out": str(part), "resume": True}))
    ref, got = zarr.open_group(str(d / "needed"), mode="r"), zarr.open_group(str(part), mode="r")
    for name in ("hidden", "hidden_scale", "bad_rows", "row_kept"):
        assert np.array_equal(ref[name][:], got[name][:], equal_nan=True), name
    assert verify(str(part), deep=True)["healthy"]
    (part / chunk_key("row_kept", 0)).unlink()
    assert any("row_kept/c/0" in p for p in verify(str(part))["problems"])


@pytest.mark.parametrize("layout", ["all", "needed"])
def test_the_plain_zarr_reader_in_the_format_doc_reads_both_layouts(pair, layout):
    """docs/cache-format.md's first snippet, run as written on each layout, reads sequence 3's stored rows."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "cache-format.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1).replace('"cache.zarr"', repr(str(pair / layout)))
    ns: dict = {}
    exec(code, ns)
    c = Cache(pair / layout)
    a, b = int(c.offsets[3]), int(c.offsets[4])
    want = c.read_hidden(a, b)
    if c.row_kept is not None:
        want = want[torch.from_numpy(c.row_kept[a:b])]
    assert np.array_equal(ns["h"], want.numpy()) and np.array_equal(ns["labels"], c.array("labels")[a:b])
