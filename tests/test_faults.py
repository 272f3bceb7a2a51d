"""Faults during a dump: NaN/Inf from the model, a full disk. Nothing lost, nothing silently wrong."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
import zarr
from conftest import sharegpt_slice, write_jsonl

from medusa_cache import store
from medusa_cache.backbone import ModelPass
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.store import Cache
from medusa_cache.train import TrainConfig, split
from medusa_cache.verify import verify


def _cfg(tiny_llama, data, out, **kw):
    return DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(out), dtype="float32", max_length=128,
                      chunk_tokens=128, shard_tokens=512, **kw)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(60))


def _poison(monkeypatch, seq_start_token: int):
    """Simulate a model that returns NaN for the sequence starting at this token."""
    real = ModelPass.run

    def run(self, ids, batch):
        out = [rows.clone() for rows in real(self, ids, batch)]
        for (s0, _, _), rows in zip(batch, out, strict=True):
            if s0 == seq_start_token:
                rows[-1, 0] = float("nan")
        return out

    monkeypatch.setattr(ModelPass, "run", run)


def test_nan_states_are_recorded_and_excluded_not_a_crash(tmp_path, tiny_llama, data, monkeypatch):
    run_dump(_cfg(tiny_llama, data, tmp_path / "ref"))
    offsets = Cache(tmp_path / "ref").offsets
    _poison(monkeypatch, int(offsets[5]))
    s = run_dump(_cfg(tiny_llama, data, tmp_path / "c"))
    c = Cache(tmp_path / "c")
    assert c.complete and s["nonfinite_rows"] == 1
    assert c.bad_seqs().tolist() == [5]
    train_seqs, val_seqs = split(c, TrainConfig(cache="x", out="y"))
    assert 5 not in train_seqs and 5 not in val_seqs
    res = verify(str(tmp_path / "c"), deep=True)
    assert res["nonfinite_rows"] == 1 and any("sequences [5]" in p for p in res["problems"])


def test_strict_makes_nan_an_error_naming_the_row(tmp_path, tiny_llama, data, monkeypatch):
    run_dump(_cfg(tiny_llama, data, tmp_path / "ref"))
    offsets = Cache(tmp_path / "ref").offsets
    _poison(monkeypatch, int(offsets[5]))
    want = r"--strict: NaN/Inf hidden state at token \d+ \(sequence 5, .*chat.jsonl row 6\)"
    with pytest.raises(UserError, match=want):
        run_dump(_cfg(tiny_llama, data, tmp_path / "c", strict=True))
    assert not Cache(tmp_path / "c").complete


def test_full_disk_stops_cleanly_and_resume_completes_bit_identical(tmp_path, tiny_llama, data, monkeypatch):
    run_dump(_cfg(tiny_llama, data, tmp_path / "ref"))
    real, calls = store.CacheWriter.write_unit, {"n": 0}

    def write_unit(self, k, h, aux=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, k, h, aux)

    monkeypatch.setattr(store.CacheWriter, "write_unit", write_unit)
    with pytest.raises(UserError, match="writing unit 2 .* failed: No space left on device; .* --resume"):
        run_dump(_cfg(tiny_llama, data, tmp_path / "c"))
    c = Cache(tmp_path / "c")
    assert not c.complete and c.done_units()[:2].all() and not c.done_units()[2]
    monkeypatch.setattr(store.CacheWriter, "write_unit", real)
    run_dump(_cfg(tiny_llama, data, tmp_path / "c", resume=True))
    a, b = zarr.open_group(str(tmp_path / "ref"), mode="r"), zarr.open_group(str(tmp_path / "c"), mode="r")
    assert np.array_equal(a["hidden"][:], b["hidden"][:]) and b.attrs["complete"]
    assert torch.isfinite(Cache(tmp_path / "c").read_hidden(0, 10)).all()
