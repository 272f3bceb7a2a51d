"""`medusa-cache verify` finds what a crash, a bad disk or a bad model leaves behind."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr

from medusa_cache.cli import main
from medusa_cache.errors import UserError
from medusa_cache.store import FORMAT_VERSION, Cache, CacheWriter, chunk_key, shard_key
from medusa_cache.train import TrainConfig, train
from medusa_cache.verify import verify


@pytest.fixture
def copy(tmp_path, dumped):
    shutil.copytree(dumped, tmp_path / "c")
    return tmp_path / "c"


def test_a_fresh_dump_is_healthy(dumped, capsys):
    assert verify(str(dumped), deep=True)["healthy"]
    assert main(["verify", str(dumped), "--deep"]) == 0
    assert "healthy" in capsys.readouterr().out


def test_a_corrupted_shard_is_found_and_training_refuses_it(copy, tmp_path):
    shard = copy / shard_key("hidden", 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    res = verify(str(copy), deep=True)
    assert not res["healthy"] and any("unit 2" in p and "hidden/c/2/0" in p for p in res["problems"])
    with pytest.raises(SystemExit) as e:
        main(["verify", str(copy), "--deep"])
    assert e.value.code == 1
    with pytest.raises(UserError, match=r"shard hidden/c/2/0 \(unit 2, rows 2048:3072\) fails its index checksum"):
        train(TrainConfig(cache=str(copy), out=str(tmp_path / "h"), epochs=1, in_memory=True))


def test_labels_that_disagree_with_the_mapping_are_found(copy):
    g = zarr.open_group(str(copy), mode="r+")
    lab = g["labels"][:]
    i = int(np.flatnonzero(lab != -100)[5])
    lab[i] = (lab[i] + 1) % 300
    g["labels"][:] = lab
    res = verify(str(copy))
    assert any(f"first at token {i}" in p for p in res["problems"])


def test_nan_hidden_states_are_counted_and_located(copy):
    c = CacheWriter(copy)
    a, b = c.unit_range(1)
    h = c.read_hidden(a, b).clone()
    h[10, 3] = float("nan")
    c.write_unit(1, h)
    res = verify(str(copy), deep=True)
    seq = int(np.searchsorted(c.offsets, a + 10, side="right") - 1)
    assert res["nonfinite_rows"] == 1 and any(f"sequences [{seq}]" in p for p in res["problems"])


def test_complete_flag_without_all_units_and_newer_format(copy):
    g = zarr.open_group(str(copy), mode="r+")
    g["unit_done"][1] = 0
    assert any("marked complete but units [1]" in p for p in verify(str(copy))["problems"])
    g.attrs["medusa_cache"] = FORMAT_VERSION + 1
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1} is newer"):
        verify(str(copy))


def test_model_spot_check_catches_pre_norm_states(copy, tiny_llama):
    from medusa_cache.verify import spot_check

    assert spot_check(Cache(copy), str(tiny_llama), n=3) == []
    # overwrite one unit with states that are not the post-norm ones (rescaled and shifted, as a pre-norm read)
    c = CacheWriter(copy)
    a, b = c.unit_range(0)
    h = c.read_hidden(a, b).clone()
    c.write_unit(0, h * 3.0 + 0.5)
    problems = spot_check(Cache(copy), str(tiny_llama), n=c.n_seqs)
    assert problems and "differ from a fresh model run" in problems[0]
    from conftest import STORIES

    assert "is not the model this cache was dumped with" in spot_check(Cache(copy), str(STORIES))[0]


@pytest.mark.parametrize("name", ["hidden", "bad_rows", "input_ids", "loss_mask", "labels", "seq_offsets",
                                  "seq_source", "d2t", "t2d", "token_counts", "unit_done"])
def test_a_missing_chunk_of_any_array_is_named_and_training_refuses(copy, tmp_path, name, capsys):
    chunks = sorted(p for p in (copy / name / "c").rglob("*") if p.is_file())
    assert chunks, f"{name} has no chunk files"
    victim = chunks[len(chunks) // 2]
    key = victim.relative_to(copy).as_posix()
    victim.unlink()
    res = verify(str(copy))  # not --deep: presence is checked from the store's listing
    assert not res["healthy"]
    assert any(key in p and "missing" in p for p in res["problems"]), res["problems"]
    with pytest.raises(SystemExit) as e:
        main(["verify", str(copy)])
    assert e.value.code == 1
    assert key in capsys.readouterr().out
    with pytest.raises(UserError, match=key.replace("/", "/")):
        train(TrainConfig(cache=str(copy), out=str(tmp_path / "h"), epochs=1, in_memory=True))
    assert not (tmp_path / "h").exists()


def test_a_missing_chunk_never_reads_as_plausible_data(copy):
    (copy / shard_key("hidden", 1)).unlink()
    (copy / chunk_key("input_ids", 1)).unlink()
    c = Cache(copy)
    a, b = c.unit_range(1)
    assert torch.isnan(c.read_hidden(a, b).float()).all()  # the bf16/f32 NaN fill, not zeros
    assert (c.group["input_ids"][a:b] == -1).all()


def test_an_incomplete_store_is_not_healthy_unless_partial_is_allowed(copy, capsys):
    g = zarr.open_group(str(copy), mode="r+")
    g.attrs["complete"] = False
    g["unit_done"][3] = 0
    res = verify(str(copy))
    assert not res["healthy"] and any("incomplete" in p and "[3]" in p for p in res["problems"])
    with pytest.raises(SystemExit):
        main(["verify", str(copy)])
    assert verify(str(copy), allow_partial=True)["healthy"]
    assert main(["verify", str(copy), "--allow-partial"]) == 0


def test_sequences_with_nan_rows_are_left_out_of_validation_eval_and_training(tmp_path):
    from test_train import make_cache

    from medusa_cache.evaluate import EvalConfig, run_eval

    torch.manual_seed(0)
    make_cache(tmp_path / "train", [0, 100, 300], np.arange(300) % 30, torch.randn(300, 32), draft=30)
    val_h = torch.randn(200, 32)
    val_h[60, 5] = float("nan")  # sequence 1 of the validation cache (rows 50..119)
    make_cache(tmp_path / "val", [0, 50, 120, 200], np.arange(200) % 30, val_h, draft=30)
    res = train(TrainConfig(cache=str(tmp_path / "train"), val_cache=str(tmp_path / "val"), out=str(tmp_path / "h"),
                            num_heads=2, epochs=1, grad_accum=1, batch_tokens=64))
    assert all(np.isfinite(res["val_loss"])), res
    assert res["val_tokens"][0] == (50 - 2) + (80 - 2)  # sequences 0 and 2 only; head 0 has len-2 targets each
    ev = run_eval(EvalConfig(str(tmp_path / "h"), str(tmp_path / "val")))
    keep = torch.cat([val_h[:50], val_h[120:]])  # the same cache without the NaN sequence
    make_cache(tmp_path / "val2", [0, 50, 130], np.r_[np.arange(50), np.arange(120, 200)] % 30, keep, draft=30)
    ev2 = run_eval(EvalConfig(str(tmp_path / "h"), str(tmp_path / "val2")))
    assert ev["positions"] == ev2["positions"] and ev["top1"] == ev2["top1"] and np.isfinite(ev["top1"]).all()


def test_store_attributes_are_typed_and_checked_on_open(copy):
    g = zarr.open_group(str(copy), mode="r+")
    assert Cache(copy).meta.draft_vocab_size == 300 and Cache(copy).meta.pipeline == "medusa-cache"
    g.attrs["shard_tokens"] = "1024"
    with pytest.raises(UserError, match="attribute 'shard_tokens' should be int, found '1024'"):
        Cache(copy)


def test_model_spot_check_compares_like_with_like_batched_bf16(tmp_path, tiny_llama, monkeypatch):
    """A deep bf16 model's rows depend on the batch they were computed in (padding and neighbours change the
    kernels' accumulation order: 4% of a row's scale on SmolLM2-135M-Instruct's 30 layers). Stood in for here,
    deterministically, by a model pass whose rows shift by 3% whenever a batch holds more than one sequence:
    the spot check must recompute each sequence in the batch the dump ran it in (no false alarm) and still see a
    stored row that was changed."""
    from conftest import write_jsonl

    from medusa_cache.backbone import ModelPass
    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.verify import spot_check

    real = ModelPass.run

    def batch_dependent(self, ids, batch):
        return [r * (1.03 if len(batch) > 1 else 1.0) for r in real(self, ids, batch)]

    monkeypatch.setattr(ModelPass, "run", batch_dependent)
    chat = {"messages": [{"role": "user", "content": "Tell me a story about a red fox."},
                         {"role": "assistant", "content": "Once upon a time a red fox lived in a wood."}]}
    data = write_jsonl(tmp_path / "d.jsonl", [chat] * 6)  # equal lengths: one batch of six
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(tmp_path / "c"), dtype="bfloat16"))
    assert spot_check(Cache(tmp_path / "c"), str(tiny_llama), n=6) == []
    c = CacheWriter(tmp_path / "c")
    a, b = c.unit_range(0)
    h = c.read_hidden(a, b).clone()
    h[int(c.offsets[2]) + 3] *= 1.05  # one row of sequence 2, 5% off
    c.write_unit(0, h)
    problems = spot_check(Cache(tmp_path / "c"), str(tiny_llama), n=6)
    assert len(problems) == 1 and problems[0].startswith("sequence 2: stored hidden states differ")
