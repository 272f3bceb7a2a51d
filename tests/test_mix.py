"""`train --batch-tokens N --mix positions`: batches of N trainable positions drawn from windows of whole sequences."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file
from test_train import make_cache

from medusa_cache.loader import all_targets, make_blocks, make_position_plan, trainable_rows
from medusa_cache.stream import BatchStream, StreamSource
from medusa_cache.train import TrainConfig, train
from medusa_cache.vocab import IGNORE


def _cache(tmp_path, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(40, 220, 40)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    offsets = offsets[offsets <= n]
    n = int(offsets[-1])
    # assistant spans: labels valid in runs, as in chats
    labels = np.where((np.arange(n) // 37) % 2 == 1, rng.integers(0, 30, n), IGNORE)
    hidden = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 8)  # row t holds t: batches say which rows
    return make_cache(tmp_path / "c", offsets, labels, hidden, draft=30), labels


def test_trainable_rows_are_those_with_a_head_target():
    labels = np.array([IGNORE, IGNORE, IGNORE, 5, IGNORE, IGNORE] + [7, IGNORE, IGNORE])
    offsets = np.array([0, 6, 9])
    got = trainable_rows(labels, offsets, num_heads=2)
    want = (all_targets(labels, offsets, 2) != IGNORE).any(1)
    assert np.array_equal(got, want) and got.tolist() == [1, 1, 0] + [0] * 6  # t+2, t+3 hit row 3


def test_a_position_plan_draws_every_trainable_position_once_mixed_across_sequences(tmp_path):
    cache, labels = _cache(tmp_path)
    k, batch = 3, 128
    seqs = np.arange(cache.n_seqs)
    order = np.random.default_rng(0).permutation(seqs)
    trainable = trainable_rows(labels, cache.offsets, k)
    plan = make_position_plan(order, cache.offsets, trainable, 1000, batch, seed=0, epoch=0)
    assert len(plan) == -(-int(trainable.sum()) // batch)
    blocks = make_blocks(seqs, cache.offsets, 500)
    tg_all = all_targets(labels, cache.offsets, k)
    seen = []
    stream = BatchStream(StreamSource(cache, labels, k, blocks, lookahead=k), plan)
    for b in stream:
        rows = b.hidden[:, 0].long().numpy()
        assert np.array_equal(b.targets.numpy(), tg_all[rows])  # each position carries its own targets
        for i in range(k):  # distillation rows: t+1+i of the same sequence, or -1 past its end
            ix = b.ahead_idx[:, i].numpy()
            end = cache.offsets[np.searchsorted(cache.offsets, rows, side="right")]
            assert np.array_equal(ix >= 0, rows + 1 + i < end)
            assert np.array_equal(b.ahead[ix[ix >= 0], 0].long().numpy(), (rows + 1 + i)[ix >= 0])
        seen.append(rows)
    stream.close()
    allrows = np.concatenate(seen)
    assert np.array_equal(np.sort(allrows), np.flatnonzero(trainable))  # every trainable position exactly once
    seq_of = np.searchsorted(cache.offsets, seen[0], side="right") - 1
    assert len(np.unique(seq_of)) >= 4  # one batch mixes positions of many sequences
    # resuming at batch 3 (of another rank layout: rank 1 of 2) gives exactly those batches
    tail = [b.hidden[:, 0].long().numpy() for b in BatchStream(StreamSource(cache, labels, k, blocks), plan, start=1,
                                                               rank=1, world=2)]
    assert all(np.array_equal(a, b) for a, b in zip(tail, seen[3::2], strict=True))


def test_position_mixed_training_resumes_to_the_same_weights_and_streams_as_in_memory(tmp_path):
    cache, _ = _cache(tmp_path)
    base = dict(cache=str(tmp_path / "c"), num_heads=3, epochs=2, lr=1e-2, batch_tokens=128, mix_tokens=700,
                grad_accum=2, val_fraction=0.1, checkpoint_every=1000)
    train(TrainConfig(out=str(tmp_path / "ref"), **base))
    train(TrainConfig(out=str(tmp_path / "mem"), in_memory=True, **base))
    train(TrainConfig(out=str(tmp_path / "k"), max_steps=3, **base))  # stops mid-epoch, inside a window
    train(TrainConfig(out=str(tmp_path / "k"), resume=True, **base))
    a = load_file(str(tmp_path / "ref" / "medusa_lm_head.safetensors"))
    for other in ("mem", "k"):
        b = load_file(str(tmp_path / other / "medusa_lm_head.safetensors"))
        assert all(torch.equal(a[key], b[key]) for key in a), other
    pieces = load_file(str(train(TrainConfig(out=str(tmp_path / "p"), mix="pieces", **base)) and
                           tmp_path / "p" / "medusa_lm_head.safetensors"))
    assert any(not torch.equal(a[key], pieces[key]) for key in a)


def test_positions_drawn_do_not_depend_on_the_head_count(tmp_path):
    """ablate trains the largest head count once and slices it: a K-head run must see the same batches."""
    from medusa_cache.traindata import mix_reach

    cache, labels = _cache(tmp_path)
    order = np.arange(cache.n_seqs)
    plans = [make_position_plan(order, cache.offsets, trainable_rows(labels, cache.offsets, mix_reach(k)),
                                1000, 128, seed=0, epoch=0) for k in (1, 3, 5)]
    assert all(np.array_equal(p.local, plans[0].local) for p in plans)
    assert mix_reach(12) == 12  # beyond the reach, the head count decides
