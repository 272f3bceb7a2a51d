"""The cache format is declared once (``store.spec``): the docs' tables, the arrays a store holds and the shapes
``verify`` checks all follow the one table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from medusa_cache.store import ARRAYS, SPECS, Cache, Layout, StoreMeta, audit, from_arrays, needed_rows, upgrade
from medusa_cache.vocab import VocabMapping

DOC = Path(__file__).parent.parent / "docs" / "cache-format.md"


def _table(header: str) -> list[list[str]]:
    lines = DOC.read_text().splitlines()
    i = lines.index(header)
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_the_docs_array_table_is_the_declared_table():
    documented = {re.fullmatch(r"`(\w+)`", r[0]).group(1): (r[1], r[2]) for r in
                  _table("| array | shape | dtype | meaning |")}
    assert documented == {a.name: (a.shape, a.dtype) for a in ARRAYS}


def test_the_docs_fill_values_are_the_declared_ones():
    fills = {}
    for names, fill, _ in _table("| array | fill value | why it cannot be data |"):
        for name in re.findall(r"`(\w+)`", names):
            fills[name] = fill.lower()
    assert set(fills) == set(SPECS)
    for a in ARRAYS:
        if a.fill is None:  # hidden and aux_hidden: the fill depends on the dtype (spec.hidden_layout)
            continue
        want = "nan" if isinstance(a.fill, float) and math.isnan(a.fill) else str(a.fill).lower()
        assert fills[a.name] == want, a.name


def test_a_store_holds_exactly_the_declared_arrays_with_their_shapes_and_fills(tmp_path):
    n = 300
    labels = np.where(np.arange(n) % 7 < 2, 1, -100)
    kept = needed_rows(labels != -100, np.array([0, 100, n]), 2)
    for codec, aux in (("lossless", False), ("int8", False), ("lossless", True), ("int8", True)):
        c = from_arrays(tmp_path / f"{codec}{aux}", torch.randn(n, 16), [0, 100, n], labels,
                        VocabMapping(np.zeros(4, np.int64), np.ones(4, bool)), layout=Layout(64, 128),
                        hidden_codec=codec, int8_group=4, row_kept=kept if codec == "int8" and not aux else None,
                        max_heads=2, aux=torch.randn(n, 32) if aux else None)
        c = Cache(c.path)
        present = {a.name for a in ARRAYS if a.present(c.meta)}
        assert set(c.group.array_keys()) == present and ("aux_hidden" in present) == aux
        assert audit.structure(c) == [] and audit.missing_chunks(c) == []
        for name in present - {"hidden", "aux_hidden"}:
            fill, want = c.group[name].metadata.fill_value, SPECS[name].fill
            assert (isinstance(want, float) and math.isnan(want) and np.isnan(fill)) or fill == want, name


def test_verify_names_an_array_whose_shape_is_not_the_declared_one(tmp_path):
    import zarr

    n = 200
    c = from_arrays(tmp_path / "c", torch.randn(n, 8), [0, n], np.zeros(n, np.int64),
                    VocabMapping(np.zeros(4, np.int64), np.ones(4, bool)))
    zarr.open_array(str(tmp_path / "c" / "token_counts"), mode="r+").resize((3,))
    assert audit.structure(Cache(c.path)) == ["array token_counts has shape (3,), expected (4,)"]


def test_older_stores_are_upgraded_in_one_place():
    """A store written before a fingerprint existed reads as if dumped with that setting's default."""
    old = {"medusa_cache": 1, "hidden_size": 8, "hidden_dtype": "float32", "chunk_tokens": 64, "shard_tokens": 256,
           "n_units": 1, "fingerprints": {"model": "m"}}
    meta = StoreMeta.from_dict(old, "old")
    assert meta.fingerprints == {"model": "m", "hidden_codec": "lossless", "keep_rows": "all",
                                 "hidden_compression": "zstd", "aux_layers": "none"}
    assert (meta.hidden_codec, meta.keep_rows, meta.max_heads, meta.pipeline, meta.aux_layers) == (
        "lossless", "all", 0, "medusa-cache", [])
    assert upgrade({"fingerprints": {"keep_rows": "needed"}})["fingerprints"]["keep_rows"] == "needed"
    assert upgrade({"keep_rows": "needed", "max_heads": 3})["keep_rows"] == "needed"  # what a store says wins
