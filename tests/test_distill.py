"""Distillation from cached states, and scoring heads against the base model's own greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import STORIES
from test_train import make_cache

from medusa_cache.errors import UserError
from medusa_cache.evaluate import head_ranks
from medusa_cache.heads import MedusaHeads
from medusa_cache.loader import make_batches, make_blocks
from medusa_cache.objective import head_losses
from medusa_cache.stream import BatchStream, StreamSource
from medusa_cache.train import TrainConfig, train


def test_lookahead_rows_are_t_plus_1_plus_i_of_the_same_sequence(tmp_path):
    offsets = np.array([0, 7, 12])
    hidden = torch.arange(12.0)[:, None].repeat(1, 4)
    c = make_cache(tmp_path / "c", offsets, np.arange(12) % 5, hidden, draft=5)
    for bt in (None, 3, 5):
        batches = make_batches(np.array([1, 0]), offsets, 1, bt)
        for b in BatchStream(StreamSource(c, np.arange(12) % 5, 3, make_blocks(np.arange(2), offsets, 4), lookahead=3),
                               batches):
            for p, row in enumerate(b.hidden[:, 0].long().tolist()):
                end = 7 if row < 7 else 12
                for i in range(3):
                    j = int(b.ahead_idx[p, i])
                    if row + 1 + i < end:
                        assert b.ahead[j, 0] == row + 1 + i
                    else:
                        assert j == -1


def test_distill_term_is_kl_to_the_renormalised_teacher_at_t_plus_1_plus_i():
    torch.manual_seed(0)
    heads = MedusaHeads(4, 6, 2, 1)
    hidden, ahead = torch.randn(5, 4), torch.randn(7, 4)
    targets = torch.tensor([[1, 2], [3, -100], [0, 1], [5, 4], [2, 2]])
    idx = torch.tensor([[1, 2], [2, 3], [3, 4], [4, -1], [-1, -1]])
    w_teacher = torch.randn(6, 4)  # lm_head rows of the draft vocabulary: softmax over them = renormalised
    t_logp = (ahead @ w_teacher.T).log_softmax(-1)
    plain, _ = head_losses(heads, hidden, targets)
    dist, _ = head_losses(heads, hidden, targets, (t_logp, idx), 0.5)
    for i, logits in enumerate(heads(hidden)):
        valid = targets[:, i] != -100
        rows = idx[valid, i]
        q = logits[valid][rows >= 0].log_softmax(-1)
        p = t_logp[rows[rows >= 0]]
        kl = (p.exp() * (p - q)).sum(-1).mean()
        torch.testing.assert_close(dist[i], plain[i] + 0.5 * kl)


def _stories(tmp_path):
    from medusa_cache.demo import DEMO
    from medusa_cache.dump import DumpConfig, run_dump

    rows = [json.loads(x) for x in (DEMO / "prompts.jsonl").read_text().splitlines()[:20]]
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dump(DumpConfig(model=str(STORIES), data=[str(p)], out=str(tmp_path / "c"), dtype="float32",
                        draft_vocab_size=200))
    return tmp_path / "c"


def test_train_with_distill_runs_from_the_cache_and_refuses_another_model(tmp_path, dumped):
    c = _stories(tmp_path)
    train(TrainConfig(cache=str(c), out=str(tmp_path / "h"), num_heads=3, epochs=2, lr=3e-3, batch_tokens=64,
                      grad_accum=1, distill=str(STORIES), log_every=1, val_fraction=0))
    recs = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"]
    # the KL term must act: the same run without it ends farther from the teacher
    train(TrainConfig(cache=str(c), out=str(tmp_path / "plain"), num_heads=3, epochs=2, lr=3e-3, batch_tokens=64,
                      grad_accum=1, log_every=1, val_fraction=0))
    from medusa_cache.headsdir import load_heads
    from medusa_cache.store import Cache
    from medusa_cache.train import draft_lm_head

    cache = Cache(c)
    h = cache.read_hidden(0, cache.n_tokens).float()
    same_seq = np.searchsorted(cache.offsets, np.arange(1, cache.n_tokens), side="right") == \
        np.searchsorted(cache.offsets, np.arange(cache.n_tokens - 1), side="right")
    teacher = (h[1:] @ draft_lm_head(str(STORIES), cache, "--distill").T).log_softmax(-1)[same_seq]

    def kl_head0(d):
        heads, _, _ = load_heads(d)
        with torch.no_grad():
            q = heads(h[:-1])[0].log_softmax(-1)[same_seq]
        return float((teacher.exp() * (teacher - q)).sum(-1).mean())

    assert kl_head0(tmp_path / "h") < kl_head0(tmp_path / "plain") - 0.05  # measured: 2.74 vs 2.91
    with pytest.raises(UserError, match="--distill: .* is not the model the cache was dumped with"):
        train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h2"), distill=str(STORIES)))


def test_eval_against_base_greedy_tokens(tmp_path):
    """Identity vocab, base lm_head = identity: the base model's token after row r is argmax(hidden[r])."""
    cls = [3, 3, 1, 1, 4, 2, 2, 0]
    hidden = torch.zeros(8, 8)
    hidden[torch.arange(8), torch.tensor(cls)] = 1.0
    c = make_cache(tmp_path / "c", [0, 8], np.array([-100] + [1] * 7), hidden, draft=8)
    heads = MedusaHeads(8, 8, 2, 1)
    with torch.no_grad():
        for h in heads.heads:
            h[0].linear.bias.zero_()
            h[1].weight.copy_(10 * torch.eye(8))
    r = head_ranks(heads, c, np.array([0]), topk=1, base_lm_head=torch.eye(8))
    # positions t=0..6; head i's true token = cls[t+1+i] (row t+1+i inside the sequence); head predicts cls[t]
    want0 = [0 if t + 1 < 8 and cls[t] == cls[t + 1] else -1 for t in range(7)]
    want1 = [0 if t + 2 < 8 and cls[t] == cls[t + 2] else -1 for t in range(7)]
    assert r["rank"][:, 0].tolist() == want0 and r["rank"][:, 1].tolist() == want1
    assert r["has_target"][:, 1].tolist() == [True] * 6 + [False]
