"""One capture for Medusa and Eagle3, both ways: ``dump --aux-layers`` stores the outputs of Eagle3's auxiliary decoder
layers beside the post-norm state; ``export-features`` writes them as SpecForge's and speculators' trainers read them;
``import`` reads those files back into a cache equal to the dump, and heads trained on it are the same, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import sharegpt_slice, write_jsonl

from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.export_features import ExportFeaturesConfig, export_features
from medusa_cache.importer import ImportConfig, run_import
from medusa_cache.store import Cache
from medusa_cache.verify import verify

SMALL = ("input_ids", "loss_mask", "labels", "seq_offsets", "d2t", "t2d", "token_counts")


@pytest.fixture(scope="module")
def aux_cache(tmp_path_factory, tiny_llama8):
    """24 real conversations through the 8-layer tiny Llama, float32, with speculators' layers (1, 3, 4 and 7)."""
    d = tmp_path_factory.mktemp("aux")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(24))
    run_dump(DumpConfig(model=str(tiny_llama8), data=[str(data)], out=str(d / "cache"), draft_vocab_size=200,
                        dtype="float32", max_length=128, chunk_tokens=128, shard_tokens=512, forward_tokens=1,
                        aux_layers="speculators"))
    return d / "cache"


def test_aux_layers_are_the_outputs_of_those_decoder_layers_before_any_norm(aux_cache, tiny_llama8):
    from transformers import AutoModelForCausalLM

    c = Cache(aux_cache)
    assert c.meta.aux_layers == [1, 3, 4, 7] and c.meta.model_layers == 8
    model = AutoModelForCausalLM.from_pretrained(tiny_llama8, dtype=torch.float32).eval()
    ids, h = c.array("input_ids"), c.hidden_size
    for s in range(4):
        a, b = int(c.offsets[s]), int(c.offsets[s + 1])
        with torch.inference_mode():  # forward_tokens=1: each sequence ran alone, as here: the same bits
            out = model.model(torch.from_numpy(ids[a:b].astype(np.int64))[None], output_hidden_states=True)
        aux = c.read_aux(a, b)
        for j, layer in enumerate((1, 3, 4)):  # transformers' hidden_states[l + 1] = output of decoder layer l
            assert torch.equal(aux[:, j * h : (j + 1) * h], out.hidden_states[layer + 1][0]), (s, layer)
        last = aux[:, 3 * h :]  # layer 7's output is the final norm's input: the norm of it is what `hidden` holds
        assert not torch.equal(last, c.read_hidden(a, b))
        assert torch.equal(model.model.norm(last), c.read_hidden(a, b))


def test_verify_checks_the_aux_layers_against_the_model_and_inspect_shows_their_bytes(aux_cache, tiny_llama8,
                                                                                        tmp_path):
    import shutil

    import zarr

    from medusa_cache.info import inspect_store

    assert verify(str(aux_cache), deep=True, model=str(tiny_llama8), samples=3)["healthy"]
    info = inspect_store(str(aux_cache))
    assert info["format_version"] == 6 and info["aux_layers"].startswith("[1, 3, 4, 7] (aux_hidden: ")
    bad = tmp_path / "bad"
    shutil.copytree(aux_cache, bad)
    g = zarr.open_group(str(bad), mode="r+")
    with zarr.config.set({"array.write_empty_chunks": True}):
        g["aux_hidden"][:] = g["aux_hidden"][:] * 1.5  # a capture of other layers: every checksum is still right
    res = verify(str(bad), model=str(tiny_llama8), samples=2)
    assert not res["healthy"] and any("auxiliary layer 1 (aux_hidden) differ" in p for p in res["problems"])


def test_the_aux_flag_is_checked_by_name(tmp_path, tiny_llama, tiny_llama8, small_chat):
    with pytest.raises(UserError, match="--aux-layers eagle3: layers .* of this 2-layer model"):
        run_dump(DumpConfig(model=str(tiny_llama), data=[str(small_chat)], out=str(tmp_path / "a"),
                            aux_layers="eagle3"))
    with pytest.raises(UserError, match="--aux-layers: '1,x' is not eagle3"):
        run_dump(DumpConfig(model=str(tiny_llama8), data=[str(small_chat)], out=str(tmp_path / "b"),
                            aux_layers="1,x"))
    with pytest.raises(UserError, match="--aux-layers: .*--keep-rows needed"):
        DumpConfig(model="m", data=["d"], out="o", aux_layers="eagle3", keep_rows="needed")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _same_cache(got: Cache, ours: Cache) -> None:
    for name in SMALL:
        assert np.array_equal(got.array(name), ours.array(name)), name
    assert torch.equal(got.read_hidden(0, got.n_tokens), ours.read_hidden(0, ours.n_tokens))
    assert got.meta.fingerprints["model"] == ours.meta.fingerprints["model"]


@pytest.mark.slow
def test_dump_with_aux_export_import_and_train_give_the_same_cache_and_heads(aux_cache, tiny_llama8, tmp_path):
    """The round trip through both peers' layouts: the imported caches equal the dump (hidden, aux, ids, masks,
    labels, vocabulary), and heads trained on an import equal heads trained on the dump, bit for bit."""
    from safetensors.torch import load_file

    from medusa_cache.train import TrainConfig, train

    ours = Cache(aux_cache)
    sf = export_features(ExportFeaturesConfig(cache=str(aux_cache), format="specforge", out=str(tmp_path / "sf"),
                                              compress=True))
    assert sf["aux_layers"] == [1, 3, 4] and sf["sequences"] == ours.n_seqs
    run_import(ImportConfig(src=str(tmp_path / "sf"), model=str(tiny_llama8), out=str(tmp_path / "c1"),
                            keep_aux=True))
    got = Cache(tmp_path / "c1")
    _same_cache(got, ours)
    assert got.meta.aux_layers == [1, 3, 4]
    assert torch.equal(got.read_aux(0, got.n_tokens), ours.read_aux(0, ours.n_tokens)[:, : 3 * ours.hidden_size])

    sp = export_features(ExportFeaturesConfig(cache=str(aux_cache), format="speculators", out=str(tmp_path / "sp")))
    assert sp["aux_layers"] == [1, 3, 4, 7]
    run_import(ImportConfig(src=str(tmp_path / "sp"), format="speculators", model=str(tiny_llama8),
                            out=str(tmp_path / "c2"), keep_aux=True))  # the vocabulary: the export's d2t/t2d.npy
    got = Cache(tmp_path / "c2")
    _same_cache(got, ours)  # speculators' last slot (before the norm) through the model's own norm: our hidden
    assert got.meta.aux_layers == [1, 3, 4, 7]
    assert torch.equal(got.read_aux(0, got.n_tokens), ours.read_aux(0, ours.n_tokens))
    assert verify(str(tmp_path / "c2"), deep=True, model=str(tiny_llama8), samples=2)["healthy"]

    common = dict(num_heads=2, epochs=1, batch_tokens=256, grad_accum=1, val_fraction=0.1, seed=3)
    for name, cache in (("h0", aux_cache), ("h2", tmp_path / "c2")):
        train(TrainConfig(cache=str(cache), out=str(tmp_path / name), **common))
    a, b = (load_file(str(tmp_path / h / "medusa_lm_head.safetensors")) for h in ("h0", "h2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_features_refuses_what_it_cannot_write_by_name(dumped, aux_cache, tmp_path):
    with pytest.raises(UserError, match="no auxiliary layers stored: .*--aux-layers eagle3"):
        export_features(ExportFeaturesConfig(cache=str(dumped), out=str(tmp_path / "x")))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--out: .*mine already exists"):
        export_features(ExportFeaturesConfig(cache=str(aux_cache), out=str(tmp_path / "mine")))
    with pytest.raises(UserError, match="--overwrite: .*does not hold an export-features output"):
        export_features(ExportFeaturesConfig(cache=str(aux_cache), out=str(tmp_path / "mine"), overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="--compress: only --format specforge"):
        ExportFeaturesConfig(cache="c", out="o", format="speculators", compress=True)


def test_speculators_export_needs_the_last_layer_before_the_norm(tmp_path, tiny_llama8, small_chat):
    run_dump(DumpConfig(model=str(tiny_llama8), data=[str(small_chat)], out=str(tmp_path / "c"), max_length=64,
                        aux_layers="eagle3"))
    with pytest.raises(UserError, match=r"--format speculators: .*stores layers \[1, 3, 4\].*--aux-layers specul"):
        export_features(ExportFeaturesConfig(cache=str(tmp_path / "c"), format="speculators", out=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()


def test_a_killed_import_resumes_to_the_same_store(aux_cache, tiny_llama8, tmp_path, monkeypatch):
    from medusa_cache.store import CacheWriter

    export_features(ExportFeaturesConfig(cache=str(aux_cache), out=str(tmp_path / "sf")))
    cfg = dict(src=str(tmp_path / "sf"), model=str(tiny_llama8), keep_aux=True, chunk_tokens=128, shard_tokens=512)
    run_import(ImportConfig(out=str(tmp_path / "whole"), **cfg))
    real = CacheWriter.write_unit

    def dies_at_unit_2(self, k, h, aux=None):
        if k == 2:
            raise KeyboardInterrupt  # the kill, at a given unit
        return real(self, k, h, aux)

    monkeypatch.setattr(CacheWriter, "write_unit", dies_at_unit_2)
    with pytest.raises(KeyboardInterrupt):
        run_import(ImportConfig(out=str(tmp_path / "c"), **cfg))
    assert not Cache(tmp_path / "c").complete
    monkeypatch.setattr(CacheWriter, "write_unit", real)
    with pytest.raises(UserError, match="--resume to continue it"):
        run_import(ImportConfig(out=str(tmp_path / "c"), **cfg))
    run_import(ImportConfig(out=str(tmp_path / "c"), resume=True, **cfg))
    got, whole = Cache(tmp_path / "c"), Cache(tmp_path / "whole")
    assert got.complete and whole.n_units > 2
    _same_cache(got, whole)
    assert torch.equal(got.read_aux(0, got.n_tokens), whole.read_aux(0, whole.n_tokens))


def test_bad_speculators_files_are_named(aux_cache, tiny_llama8, tmp_path):
    from safetensors.torch import load_file, save_file

    export_features(ExportFeaturesConfig(cache=str(aux_cache), format="speculators", out=str(tmp_path / "sp")))
    f = tmp_path / "sp" / "hidden_states" / "hs_4.safetensors"
    d = load_file(str(f))
    save_file({"hidden_states": d["hidden_states"], "token_ids": d["token_ids"].flip(0).contiguous()}, str(f))
    cfg = dict(src=str(tmp_path / "sp"), format="speculators", model=str(tiny_llama8))
    with pytest.raises(UserError, match=f"{f}: token_ids differ from dataset row 4"):
        run_import(ImportConfig(out=str(tmp_path / "c"), **cfg))
    f.unlink()
    with pytest.raises(UserError, match=f"{f}: missing"):
        run_import(ImportConfig(out=str(tmp_path / "c"), **cfg))
    s = run_import(ImportConfig(out=str(tmp_path / "c"), skip_bad_rows=True, **cfg))
    assert s["skipped"] == 1 and s["sequences"] == Cache(aux_cache).n_seqs - 1
    with pytest.raises(UserError, match="--model: .*cannot load"):
        run_import(ImportConfig(out=str(tmp_path / "d"), **{**cfg, "model": str(tmp_path / "sp" / "hidden_states")}))


def test_the_golden_files_the_peers_readers_accepted_import_to_one_cache(tmp_path):
    """tests/fixtures/peers: stories260K's export that SpecForge's and speculators' own readers accepted
    (tools/peer_readers.py, provenance.json). Imported, both give the same post-norm states (speculators' last slot
    through the model's norm, in bf16), and SpecForge's imported with its aux layers exports back unchanged."""
    from pathlib import Path

    from medusa_cache.peers import load_specforge

    gold = Path(__file__).parent / "fixtures" / "peers"
    model = Path(__file__).parent.parent / "medusa_cache" / "demo" / "stories260K"
    run_import(ImportConfig(src=str(gold / "specforge"), model=str(model), out=str(tmp_path / "sf"), keep_aux=True,
                            aux_layers="1,2,3"))
    run_import(ImportConfig(src=str(gold / "speculators"), format="speculators", model=str(model),
                            out=str(tmp_path / "sp")))  # its vocabulary: d2t.npy/t2d.npy, the same as vocab_mapping.pt
    sf, sp = Cache(tmp_path / "sf"), Cache(tmp_path / "sp")
    assert sf.hidden_dtype == sp.hidden_dtype == "bfloat16" and sp.meta.aux_layers == []
    _same_cache(sp, sf)
    export_features(ExportFeaturesConfig(cache=str(tmp_path / "sf"), out=str(tmp_path / "again")))
    for f in sorted((gold / "specforge").rglob("data_*.ckpt")):
        a, b = load_specforge(f), load_specforge(tmp_path / "again" / f.relative_to(gold / "specforge"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_a_flipped_byte_in_the_aux_layers_is_named_by_verify_and_refused_by_export(aux_cache, tmp_path):
    """Medusa training never reads aux_hidden, so it is not refused there; verify and export-features name it."""
    import shutil

    store = tmp_path / "c"
    shutil.copytree(aux_cache, store)
    f = min(p for p in (store / "aux_hidden" / "c").rglob("*") if p.is_file())
    data = bytearray(f.read_bytes())
    data[5] ^= 0x5A
    f.write_bytes(bytes(data))
    res = verify(str(store))
    assert not res["healthy"] and any("aux_hidden" in p and "checksum" in p for p in res["problems"]), res
    with pytest.raises(UserError, match="aux_hidden"):
        export_features(ExportFeaturesConfig(cache=str(store), out=str(tmp_path / "sf")))


def test_int8_stores_the_aux_layers_in_the_same_codec(tmp_path, tiny_llama8, small_chat):
    """--hidden-codec int8 encodes aux_hidden as hidden is encoded (a scale per group, aux_scale), within the codec's
    error of the lossless states."""
    common = dict(model=str(tiny_llama8), data=[str(small_chat)], max_length=64, aux_layers="1,3", dtype="float32")
    run_dump(DumpConfig(out=str(tmp_path / "f"), **common))
    run_dump(DumpConfig(out=str(tmp_path / "q"), hidden_codec="int8", **common))
    f, q = Cache(tmp_path / "f"), Cache(tmp_path / "q")
    assert "aux_scale" in q.group and "aux_scale" not in f.group and q.meta.aux_layers == [1, 3]
    a, b = f.read_aux(0, f.n_tokens), q.read_aux(0, q.n_tokens)
    assert a.shape == b.shape == (f.n_tokens, 2 * f.hidden_size)
    rel = ((b - a).norm(dim=1) / a.norm(dim=1)).max().item()
    assert 0 < rel < 0.02, rel
