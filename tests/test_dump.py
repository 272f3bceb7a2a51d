"""The dump: store round trip against a direct model run, packing, labels, resume, bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli, run_fault, sharegpt_slice, write_jsonl

from medusa_cache.backbone import plan_batches
from medusa_cache.data import read_rows
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.store import Cache
from medusa_cache.templater import Templater
from medusa_cache.vocab import IGNORE


def decoder(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).base_model.eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hidden_states_equal_a_direct_model_run_bit_for_bit(tmp_path, tiny_llama, small_chat, dtype):
    out = tmp_path / "c"
    # forward_tokens=1: every sequence runs alone, as the direct run does -> identical kernels and bits
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(small_chat)], out=str(out), dtype=dtype, forward_tokens=1))
    c = Cache(out)
    assert c.complete and c.hidden_dtype == dtype
    # plain zarr + numpy, as docs/cache-format.md describes
    g = zarr.open_group(str(out), mode="r")
    assert g["hidden"].dtype == (np.uint16 if dtype == "bfloat16" else np.float32)
    assert g["hidden"].attrs["logical_dtype"] == dtype
    m = decoder(tiny_llama, getattr(torch, dtype))
    ids = c.array("input_ids")
    for s in range(c.n_seqs):
        a, b = c.offsets[s], c.offsets[s + 1]
        with torch.inference_mode():
            ref = m(input_ids=torch.from_numpy(ids[a:b].astype(np.int64))[None]).last_hidden_state[0]
        assert torch.equal(c.read_hidden(a, b), ref), f"sequence {s}"


def test_batched_and_unit_crossing_sequences_match_within_rounding(dumped, tiny_llama):
    c = Cache(dumped)
    assert c.n_units > 3
    crossing = [s for s in range(c.n_seqs) if c.offsets[s] // 1024 != (c.offsets[s + 1] - 1) // 1024]
    assert crossing, "fixture should have sequences that cross unit boundaries"
    m = decoder(tiny_llama, torch.float32)
    ids = c.array("input_ids")
    for s in crossing[:3] + list(range(3)):
        a, b = c.offsets[s], c.offsets[s + 1]
        with torch.inference_mode():
            ref = m(input_ids=torch.from_numpy(ids[a:b].astype(np.int64))[None]).last_hidden_state[0]
        torch.testing.assert_close(c.read_hidden(a, b), ref, atol=1e-5, rtol=1e-4)


def test_packing_offsets_sources_and_labels(dumped, tiny_llama, llama_tok):
    c = Cache(dumped)
    ids, mask, labels = c.array("input_ids"), c.array("loss_mask").astype(bool), c.array("labels")
    assert len(ids) == len(mask) == len(labels) == c.offsets[-1] == c.hidden.shape[0]
    assert (np.diff(c.offsets) > 0).all()
    src = c.array("seq_source")
    rows = [r for r in read_rows(Path(dumped).parent / "chat.jsonl", 0)]
    t = Templater(llama_tok, max_length=256)
    for s in (0, 7, c.n_seqs - 1):
        ex = t.encode(rows[src[s, 1]])
        a, b = c.offsets[s], c.offsets[s + 1]
        assert np.array_equal(ids[a:b], ex.input_ids) and np.array_equal(mask[a:b], ex.loss_mask)
    m = c.mapping()
    assert np.array_equal(labels, m.labels(ids, mask))
    in_vocab = m.t2d[ids]
    assert (labels[~mask] == IGNORE).all()
    assert (labels[mask & ~in_vocab] == IGNORE).all()
    d = labels[mask & in_vocab]
    assert np.array_equal(d + m.d2t[d], ids[mask & in_vocab])
    counts = c.array("token_counts")
    assert counts.sum() == mask.sum()
    assert c.meta.counts["assistant_tokens_in_draft_vocab"] == int((labels != IGNORE).sum())


def test_plan_batches_covers_each_row_once_and_splits_at_unit_edges():
    offsets = np.array([0, 5, 12, 30, 31, 50])
    for a, b in [(0, 16), (16, 32), (32, 50)]:
        batches = plan_batches(offsets, a, b, batch_tokens=20)
        kept = sorted(r for batch in batches for (_, e, keep) in batch for r in range(keep, e))
        assert kept == list(range(a, b))
        for batch in batches:
            assert max(e - s0 for s0, e, _ in batch) * len(batch) <= 20  # every piece here fits alone


def _dump_args(model, data, out, *extra):
    return ["dump", "--model", str(model), "--data", str(data), "--out", str(out), "--draft-vocab-size", "500",
            "--max-length", "256", "--chunk-tokens", "128", "--shard-tokens", "512", "--forward-tokens", "512", *extra]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path, tiny_llama):
    """kill -9 at 10 given moments (while preparing the store, mid-batch, after a shard is written but before its
    unit is marked done, right after a commit), resuming each time."""
    data = write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(250))
    run_cli(*_dump_args(tiny_llama, data, tmp_path / "ref"))
    out = tmp_path / "killed"
    kills = [("medusa_cache.store.writer:_array", 1),  # the group exists, marked as being prepared
             ("medusa_cache.store.writer:_array", 4),  # some arrays written
             ("medusa_cache.backbone:ModelPass.run", 2),  # mid-unit: batches computed, nothing written
             ("medusa_cache.store.writer:CacheWriter.write_unit", 1),  # a shard written, its unit not marked done
             ("medusa_cache.store.writer:CacheWriter.mark_done", 1),  # right after a commit
             ("medusa_cache.backbone:ModelPass.run", 7),
             ("medusa_cache.store.writer:CacheWriter.write_unit", 2),
             ("medusa_cache.store.writer:CacheWriter.mark_done", 2),
             ("medusa_cache.store.writer:CacheWriter.write_unit", 1),
             ("medusa_cache.store.writer:CacheWriter.mark_done", 1)]
    for target, after in kills:
        args = _dump_args(tiny_llama, data, out, *(["--resume"] if out.exists() else []))
        p = run_fault(target, after, "SIGKILL", *args)
        assert p.returncode == -signal.SIGKILL, (target, after, p.stderr[-2000:])
    assert not zarr.open_group(str(out), mode="r").attrs["complete"]
    run_cli(*_dump_args(tiny_llama, data, out, "--resume"))
    a, b = zarr.open_group(str(tmp_path / "ref"), mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("hidden", "input_ids", "loss_mask", "labels", "seq_offsets", "seq_source", "d2t", "t2d",
                 "token_counts", "bad_rows"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert b.attrs["complete"] is True
    from medusa_cache.verify import verify

    assert verify(str(out), deep=True)["healthy"]


def test_resume_with_different_settings_names_what_differs(tmp_path, tiny_llama, small_chat):
    out = tmp_path / "c"
    cfg = dict(model=str(tiny_llama), data=[str(small_chat)], out=str(out), max_length=256)
    run_dump(DumpConfig(**cfg))
    with pytest.raises(UserError, match="different max_length"):
        run_dump(DumpConfig(**{**cfg, "max_length": 128}, resume=True))
    other = write_jsonl(small_chat.parent / "other.jsonl", sharegpt_slice(5, start=100))
    with pytest.raises(UserError, match="different data"):
        run_dump(DumpConfig(**{**cfg, "data": [str(other)]}, resume=True))
    with pytest.raises(UserError, match="different vocab_mapping"):
        run_dump(DumpConfig(**cfg, draft_vocab_size=100, resume=True))
    run_dump(DumpConfig(**cfg, resume=True))  # same settings: accepted (already complete)
    with pytest.raises(UserError, match="different keep_rows"):
        run_dump(DumpConfig(**cfg, keep_rows="needed", resume=True))
    # a store written before the codec and row-layout fingerprints existed was dumped with their defaults
    g = zarr.open_group(str(out), mode="r+")
    fps = dict(g.attrs["fingerprints"])
    del fps["hidden_codec"], fps["keep_rows"], fps["hidden_compression"]
    g.attrs["fingerprints"] = fps
    run_dump(DumpConfig(**cfg, resume=True))
    with pytest.raises(UserError, match="different hidden_codec"):
        run_dump(DumpConfig(**cfg, hidden_codec="int8", int8_group=16, resume=True))
    with pytest.raises(UserError, match="different hidden_compression"):
        run_dump(DumpConfig(**cfg, hidden_compression="none", resume=True))
    plain = tmp_path / "plain"
    run_dump(DumpConfig(**{**cfg, "out": str(plain)}, hidden_compression="none"))
    assert [type(c).__name__ for c in zarr.open_group(str(plain), mode="r")["hidden"].compressors] == ["Crc32cCodec"]
    assert torch.equal(Cache(plain).read_hidden(0, 100), Cache(out).read_hidden(0, 100))


def test_qwen2_dump_and_spec_forge_mapping(tmp_path, tiny_qwen, small_chat):
    from medusa_cache.vocab import build_mapping

    m = build_mapping(np.random.default_rng(1).integers(0, 50, 151936), 4000)
    torch.save({"d2t": torch.from_numpy(m.d2t), "t2d": torch.from_numpy(m.t2d)}, tmp_path / "vocab_mapping.pt")
    run_dump(DumpConfig(model=str(tiny_qwen), data=[str(small_chat)], out=str(tmp_path / "c"),
                        vocab_mapping=str(tmp_path / "vocab_mapping.pt"), dtype="float32"))
    c = Cache(tmp_path / "c")
    assert np.array_equal(c.mapping().d2t, m.d2t) and c.meta.vocab_size == 151936


BAD = [
    (["--data", "MISSING.jsonl"], "--data: file not found: MISSING.jsonl"),
    (["--max-length", "0"], "--max-length: must be in 1.."),
    (["--draft-vocab-size", "0"], "--draft-vocab-size: must be >= 1"),
    (["--format", "sharegpt"], "m.jsonl:1: missing or empty 'conversations' for format sharegpt"),
    (["--model", "/nonexistent"], "--model: /nonexistent is not a model directory"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_is_one_line_and_writes_no_complete_store(tmp_path, tiny_llama, extra, message):
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]}])
    args = ["dump", "--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "out")]
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i : i + 2]
    p = run_cli(*args, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "zarr.json").exists()


def test_existing_out_needs_resume_or_overwrite_and_nothing_is_lost(tmp_path, tiny_llama, small_chat, capsys):
    from medusa_cache.cli import main

    out = tmp_path / "c"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["dump", "--model", str(tiny_llama), "--data", str(small_chat), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["dump", "--model", str(tiny_llama), "--data", str(small_chat), "--out", str(out), "--overwrite"]) == 2
    assert "not a medusa-cache store" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_rows_stop_the_dump_or_are_skipped_and_counted(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n{broken\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
                    + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: malformed JSON line"):
        run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(tmp_path / "a")))
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(tmp_path / "b"), skip_bad_rows=True))
    counts = Cache(tmp_path / "b").meta.counts
    assert counts["skipped_input_rows"] == 1 and counts["dropped_no_assistant"] == 1 and counts["sequences"] == 1


def test_no_chat_template_is_refused(tmp_path, small_chat):
    from conftest import STORIES

    with pytest.raises(UserError, match="no chat template"):
        run_dump(DumpConfig(model=str(STORIES), data=[str(small_chat)], out=str(tmp_path / "c")))


def test_inspect_reports_counts_and_progress(dumped):
    p = run_cli("inspect", str(dumped), "--json")
    info = json.loads(p.stdout)
    c = Cache(dumped)
    assert info["complete"] and info["tokens"] == c.n_tokens and info["units_done"] == f"{c.n_units}/{c.n_units}"
    assert 0 < info["assistant_in_draft_vocab"] <= 1 and info["bytes_per_token"] > 0


def test_repeated_data_flags_are_all_used_and_an_oversized_draft_vocab_is_reported(tmp_path, tiny_llama, capsys):
    from medusa_cache.cli import main

    a = write_jsonl(tmp_path / "a.jsonl", sharegpt_slice(3))
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt_slice(3, start=50))
    assert main(["dump", "--model", str(tiny_llama), "--data", str(a), "--data", str(b), "--out",
                 str(tmp_path / "c"), "--draft-vocab-size", "100000", "--dtype", "float32"]) == 0
    cap = capsys.readouterr()
    from medusa_cache import store

    c = store.Cache(tmp_path / "c")
    assert c.meta.data_files == ["a.jsonl", "b.jsonl"] and set(c.array("seq_source")[:, 0]) == {0, 1}
    filled = c.meta.counts["draft_vocab_unseen_filled"]
    assert filled == 100000 - int((c.array("token_counts") > 0).sum()) > 0
    assert f"{filled} never-seen ids" in cap.err and f'"draft_vocab_unseen_filled": {filled}' in cap.out


def test_a_data_file_given_twice_is_refused_and_repeated_rows_are_named(tmp_path, tiny_llama, capfd):
    from medusa_cache.errors import UserError

    data = write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(3))
    with pytest.raises(UserError, match=r"--data: .*chat.jsonl is given twice"):
        DumpConfig(model=str(tiny_llama), data=[str(data), str(tmp_path / "." / "chat.jsonl")], out=str(tmp_path / "c"))
    other = write_jsonl(tmp_path / "other.jsonl", sharegpt_slice(1))  # the first row of chat.jsonl again
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(data), str(other)], out=str(tmp_path / "c"), max_length=128))
    err = capfd.readouterr().err
    assert "warning: 1 of 4 rows repeat an earlier row exactly (e.g. " in err and "other.jsonl row 1 = " in err


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen", "stories"])
def test_the_cached_states_are_what_lm_head_reads(tmp_path, model_name, request):
    """Every claim about the cache rests on this: lm_head(cached hidden) equals the logits of a plain
    ``model(ids)``, with no knowledge of how the backbone is called (a model whose base_model output is not the
    lm_head input, or a future transformers, fails here)."""
    from conftest import STORIES
    from transformers import AutoModelForCausalLM

    from medusa_cache.store import Cache

    model_dir = STORIES if model_name == "stories" else request.getfixturevalue(model_name)
    rows = [{"text": "Once upon a time there was a little dog who liked to run."},
            {"text": "The sun was warm and the children played in the park all day long."}]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    run_dump(DumpConfig(model=str(model_dir), data=[str(data)], out=str(tmp_path / "c"), dtype="float32",
                        max_length=64))
    c = Cache(str(tmp_path / "c"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = c.array("input_ids")
    for s in range(c.n_seqs):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        with torch.no_grad():
            want = model(torch.from_numpy(ids[a:b].astype("int64"))[None]).logits[0]
            got = model.get_output_embeddings()(c.reads.rows(a, b).float())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
