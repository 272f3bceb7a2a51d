"""The int8 hidden codec: half the bytes of bf16, small error, every guarantee of the lossless store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from conftest import killed_copy, sharegpt_slice, write_jsonl
from safetensors.torch import load_file

from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.store import Cache, int8_decode, int8_encode, shard_key
from medusa_cache.train import TrainConfig, train
from medusa_cache.verify import verify


def test_per_group_scales_hold_outlier_channels():
    torch.manual_seed(0)
    x = torch.randn(64, 512)
    x[:, [7, 300]] *= 60  # a few channels ~100x the rest, as in real post-norm states
    rest = [c for c in range(512) if c // 64 not in (7 // 64, 300 // 64)]  # channels outside the outliers' groups
    for group, bound in ((64, 0.01), (512, None)):
        q, s = int8_encode(x, group)
        assert q.dtype == torch.int8 and q.min() >= -127 and s.shape == (64, 512 // group)
        y = int8_decode(q, s, group)
        rest_err = (y[:, rest] - x[:, rest]).norm() / x[:, rest].norm()
        if bound:
            assert rest_err < bound
        else:  # one scale per row: every ordinary channel loses most of its precision
            assert rest_err > 0.05
    bad = torch.randn(2, 128)
    bad[1, 3] = float("nan")
    q, s = int8_encode(bad, 64)
    assert torch.isnan(int8_decode(q, s, 64)[1]).any() and torch.isfinite(int8_decode(q, s, 64)[0]).all()


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("int8")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(40))
    common = dict(model=str(tiny_llama), data=[str(data)], draft_vocab_size=300, dtype="float32", max_length=256,
                  chunk_tokens=256, shard_tokens=1024)
    run_dump(DumpConfig(out=str(d / "f32"), **common))
    run_dump(DumpConfig(out=str(d / "q"), hidden_codec="int8", int8_group=16, **common))
    return d, common


def test_int8_store_reads_close_to_float32_and_is_healthy(int8_pair):
    d, _ = int8_pair
    a, b = Cache(d / "f32"), Cache(d / "q")
    x, y = a.read_hidden(0, a.n_tokens), b.read_hidden(0, b.n_tokens)
    assert y.dtype == torch.float32 and (y - x).norm() / x.norm() < 0.01
    assert b.codec == "int8" and verify(str(d / "q"), deep=True)["healthy"]
    assert b.disk_bytes() < 0.45 * a.disk_bytes()  # vs float32; bf16 would be ~0.5


def test_int8_resume_is_bit_identical_and_a_missing_scale_chunk_is_named(int8_pair, tmp_path):
    d, common = int8_pair
    part = killed_copy(d / "q", tmp_path / "part", (0, 2))
    run_dump(DumpConfig(out=str(part), resume=True, hidden_codec="int8", int8_group=16, **common))
    ref, got = zarr.open_group(str(d / "q"), mode="r"), zarr.open_group(str(part), mode="r")
    for name in ("hidden", "hidden_scale", "bad_rows", "labels"):
        assert np.array_equal(ref[name][:], got[name][:], equal_nan=True), name
    assert verify(str(part), deep=True)["healthy"]
    (part / shard_key("hidden_scale", 1)).unlink()
    assert any("hidden_scale/c/1/0" in p for p in verify(str(part))["problems"])
    with pytest.raises(UserError, match="hidden_scale/c/1/0"):
        train(TrainConfig(cache=str(part), out=str(tmp_path / "h"), epochs=1))


def test_training_on_int8_and_on_float32_states_agree_closely(int8_pair, tmp_path):
    d, _ = int8_pair
    res = {}
    for name in ("f32", "q"):
        res[name] = train(TrainConfig(cache=str(d / name), out=str(tmp_path / name), num_heads=2, epochs=2, lr=1e-2,
                                      batch_tokens=512, grad_accum=1, val_fraction=0.2))
    assert np.allclose(res["f32"]["val_top1"], res["q"]["val_top1"], atol=0.02)


def test_int8_rows_travel_packed_and_train_exactly_as_their_decoded_values(int8_pair, tmp_path):
    """The loader hands int8 stores' rows over packed (codes + scale bytes, ~1/4 of float32) and the trainer decodes
    them on its device: the heads equal those trained on a float32 store of the decoded values, bit for bit."""
    from medusa_cache.store import from_arrays, int8_pack, int8_unpack

    d, _ = int8_pair
    q = Cache(d / "q")
    raw = q.read_hidden(0, 300, packed=True)
    assert raw.dtype == torch.int8 and raw.shape == (300, q.hidden_size + 4 * q.hidden_size // q.int8_group)
    assert torch.equal(int8_unpack(raw, q.hidden_size, q.int8_group), q.read_hidden(0, 300))
    codes, scale = torch.randint(-127, 128, (5, 64), dtype=torch.int8), torch.rand(5, 4)
    assert torch.equal(int8_unpack(int8_pack(codes, scale), 64, 16), int8_decode(codes, scale, 16))
    from_arrays(tmp_path / "decoded", q.read_hidden(0, q.n_tokens), q.offsets, q.array("labels"), q.mapping(),
                input_ids=q.array("input_ids"), loss_mask=q.array("loss_mask"))
    common = dict(num_heads=3, epochs=1, lr=1e-3, batch_tokens=256, grad_accum=1, seed=5)
    outs = []
    for name, cache, extra in (("ref", tmp_path / "decoded", {}), ("stream", d / "q", {}),
                               ("memory", d / "q", {"in_memory": True})):
        train(TrainConfig(cache=str(cache), out=str(tmp_path / name), **common, **extra))
        outs.append(load_file(str(tmp_path / name / "medusa_lm_head.safetensors")))
    for other in outs[1:]:
        assert all(torch.equal(outs[0][k], other[k]) for k in outs[0])
