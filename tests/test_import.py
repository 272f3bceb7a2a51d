"""One capture for Medusa and Eagle3: SpecForge's offline features imported into a cache equal our own dump of the
same rows, and heads trained on either are the same, bit for bit. Bad features are refused by file."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import torch

from medusa_cache.errors import UserError
from medusa_cache.importer import ImportConfig, run_import
from medusa_cache.store import Cache
from medusa_cache.verify import verify


def _specforge_dir(cache: Cache, d, aux: bool = True, gz: tuple[int, ...] = ()) -> None:
    """The cache's sequences written as SpecForge's prepare_hidden_states.py writes them: a torch.save dict per sample
    in rows_{g}-{g+2000}/data_{i}.ckpt (.ckpt.gz when compressed)."""
    ids, mask, off = cache.array("input_ids"), cache.array("loss_mask"), cache.offsets
    for s in range(cache.n_seqs):
        a, b = int(off[s]), int(off[s + 1])
        h = cache.read_hidden(a, b)
        sample = {"input_ids": torch.from_numpy(ids[a:b].astype(np.int64)),
                  "loss_mask": torch.from_numpy(mask[a:b].astype(np.int64)), "hidden_state": h[None]}
        if aux:
            sample["aux_hidden_state"] = torch.zeros(1, b - a, 3 * h.shape[1], dtype=h.dtype)
        f = d / f"rows_{s // 2000 * 2000}-{s // 2000 * 2000 + 2000}" / f"data_{s}.ckpt"
        f.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(sample, buf)
        if s in gz:
            f.with_name(f.name + ".gz").write_bytes(gzip.compress(buf.getvalue()))
        else:
            f.write_bytes(buf.getvalue())


def test_specforge_features_import_to_the_cache_a_dump_writes_and_train_the_same_heads(tmp_path, dumped, tiny_llama):
    from safetensors.torch import load_file

    from medusa_cache.train import TrainConfig, train

    ours = Cache(str(dumped))
    _specforge_dir(ours, tmp_path / "sf", gz=(1, 5))
    s = run_import(ImportConfig(src=str(tmp_path / "sf"), model=str(tiny_llama), out=str(tmp_path / "c"),
                                draft_vocab_size=300))
    assert s["sequences"] == ours.n_seqs and s["skipped"] == 0
    got = Cache(str(tmp_path / "c"))
    for name in ("input_ids", "loss_mask", "labels", "seq_offsets", "d2t", "t2d", "token_counts"):
        assert np.array_equal(got.array(name), ours.array(name)), name
    assert torch.equal(got.read_hidden(0, got.n_tokens), ours.read_hidden(0, ours.n_tokens))
    assert verify(str(tmp_path / "c"), deep=True)["healthy"]
    assert got.meta.fingerprints["model"] == ours.meta.fingerprints["model"]
    common = dict(num_heads=2, epochs=1, batch_tokens=512, grad_accum=1, val_fraction=0.1, seed=3)
    train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h1"), **common))
    train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h2"), **common))
    a, b = (load_file(str(tmp_path / h / "medusa_lm_head.safetensors")) for h in ("h1", "h2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bad(tmp_path, dumped, edit) -> str:
    ours = Cache(str(dumped))
    _specforge_dir(ours, tmp_path / "sf")
    f = tmp_path / "sf" / "rows_0-2000" / "data_3.ckpt"
    edit(f)
    return str(f)


def _rewrite(f, change):
    d = torch.load(f, weights_only=True)
    change(d)
    torch.save(d, f)


CASES = [
    ("missing key", lambda f: _rewrite(f, lambda d: d.pop("loss_mask")), "missing key\\(s\\) loss_mask"),
    ("hidden size", lambda f: _rewrite(f, lambda d: d.update(hidden_state=d["hidden_state"][..., :16])),
     "hidden_state has shape \\(1, \\d+, 16\\).*hidden size is 32"),
    ("nan", lambda f: _rewrite(f, lambda d: d["hidden_state"].__setitem__((0, 0, 0), float("nan"))), "NaN/Inf"),
    ("truncated", lambda f: f.write_bytes(f.read_bytes()[:100]), "cannot be read"),
    ("not tensors", lambda f: torch.save({"input_ids": object()}, f), "holds more than tensors"),
]


@pytest.mark.parametrize("name, edit, why", CASES, ids=[c[0] for c in CASES])
def test_a_bad_sample_is_refused_by_file_or_skipped_and_counted(tmp_path, dumped, tiny_llama, name, edit, why):
    f = _bad(tmp_path, dumped, edit)
    cfg = ImportConfig(src=str(tmp_path / "sf"), model=str(tiny_llama), out=str(tmp_path / "c"))
    with pytest.raises(UserError, match=f"{f}: .*{why}"):
        run_import(cfg)
    assert not (tmp_path / "c").exists()
    s = run_import(ImportConfig(src=str(tmp_path / "sf"), model=str(tiny_llama), out=str(tmp_path / "c"),
                                skip_bad_rows=True))
    assert s["skipped"] == 1 and s["sequences"] == Cache(str(dumped)).n_seqs - 1
    assert verify(str(tmp_path / "c"))["healthy"]


def test_a_truncated_gzip_sample_is_named(tmp_path, dumped, tiny_llama):
    ours = Cache(str(dumped))
    _specforge_dir(ours, tmp_path / "sf", gz=(2,))
    f = tmp_path / "sf" / "rows_0-2000" / "data_2.ckpt.gz"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(UserError, match=f"{f}: cannot be read"):
        run_import(ImportConfig(src=str(tmp_path / "sf"), model=str(tiny_llama), out=str(tmp_path / "c")))
