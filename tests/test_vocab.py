"""The draft vocabulary: Eagle3's top-N sorted by target id, d2t offsets, t2d mask, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medusa_cache.errors import UserError
from medusa_cache.vocab import IGNORE, build_mapping, load_mapping, save_mapping


def test_top_n_sorted_by_target_id_with_offsets_and_mask():
    counts = np.array([0, 5, 9, 1, 9, 3, 0, 7])
    m = build_mapping(counts, 4)
    # most frequent: 2 (9), 4 (9), 7 (7), 1 (5) -> sorted by id: 1, 2, 4, 7
    assert m.draft_to_target.tolist() == [1, 2, 4, 7]
    assert m.d2t.tolist() == [1 - 0, 2 - 1, 4 - 2, 7 - 3]
    assert m.d2t.dtype == np.int64 and m.t2d.dtype == np.bool_
    assert m.t2d.tolist() == [False, True, True, False, True, False, False, True]
    for d in range(4):
        assert d + m.d2t[d] == m.draft_to_target[d]


def test_ties_go_to_the_lower_token_id():
    counts = np.array([4, 4, 4, 4, 1])
    assert build_mapping(counts, 2).draft_to_target.tolist() == [0, 1]
    counts = np.array([1, 4, 2, 4, 4])
    assert build_mapping(counts, 2).draft_to_target.tolist() == [1, 3]


def test_fewer_seen_tokens_than_draft_size_fill_with_lowest_unseen_ids():
    counts = np.array([0, 0, 3, 0, 2, 0])
    assert build_mapping(counts, 4).draft_to_target.tolist() == [0, 1, 2, 4]


def test_draft_size_at_least_vocab_is_identity():
    m = build_mapping(np.arange(10), 10)
    assert (m.d2t == 0).all() and m.t2d.all() and m.draft_size == 10
    assert build_mapping(np.arange(10), 50).draft_size == 10


def test_labels_ignore_non_assistant_and_out_of_vocab_tokens():
    m = build_mapping(np.array([0, 5, 9, 1, 9, 3, 0, 7]), 4)  # draft: 1, 2, 4, 7
    ids = np.array([1, 2, 3, 4, 7, 7])
    mask = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    assert m.labels(ids, mask).tolist() == [0, 1, IGNORE, 2, 3, IGNORE]


def test_specforge_vocab_mapping_pt_is_imported_unchanged(tmp_path):
    m = build_mapping(np.random.default_rng(0).integers(0, 100, 1000), 64)
    p = tmp_path / "vocab_mapping.pt"
    torch.save({"d2t": torch.from_numpy(m.d2t), "t2d": torch.from_numpy(m.t2d)}, p)
    got = load_mapping(p, 1000)
    assert np.array_equal(got.d2t, m.d2t) and np.array_equal(got.t2d, m.t2d)
    save_mapping(m, tmp_path / "ours.safetensors")
    ours = load_mapping(tmp_path / "ours.safetensors", 1000)
    assert np.array_equal(ours.d2t, m.d2t)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_never_executed(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"d2t": Evil(), "t2d": torch.ones(3, dtype=torch.bool)}, p)
    with pytest.raises(UserError, match="cannot read"):
        load_mapping(p, 3)


def test_mapping_for_another_vocabulary_is_refused(tmp_path):
    m = build_mapping(np.arange(100), 10)
    save_mapping(m, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="covers a vocabulary of 100 tokens, the model has 200"):
        load_mapping(tmp_path / "m.safetensors", 200)
