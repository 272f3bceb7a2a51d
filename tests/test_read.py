"""Local stores are read from their shard files directly (store.ShardReader): the same bytes zarr returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medusa_cache.errors import UserError
from medusa_cache.store import Cache, Layout, ShardReader, from_arrays, needed_rows, shard_key
from medusa_cache.vocab import VocabMapping


@pytest.mark.parametrize("codec,compression,dtype", [("lossless", "zstd", "bfloat16"), ("lossless", "none", "float32"),
                                                     ("lossless", "lz4", "bfloat16"), ("int8", "zstd", "float32"),
                                                     ("int8", "none", "float32")])
@pytest.mark.parametrize("keep", ["all", "needed"])
def test_shard_files_read_equal_zarr_for_every_layout(tmp_path, codec, compression, dtype, keep):
    rng = np.random.default_rng(0)
    n = 2500  # not a multiple of the shard: the last shard is partial
    offsets = np.array([0, 300, 1100, 1900, n])
    labels = np.where(rng.random(n) < 0.3, rng.integers(0, 20, n), -100)
    kept = needed_rows(labels != -100, offsets, 2) if keep == "needed" else None
    c = from_arrays(tmp_path / "c", torch.randn(n, 32), offsets, labels,
                    VocabMapping(np.zeros(20, np.int64), np.ones(20, bool)), hidden_dtype=dtype,
                    layout=Layout(64, 512), hidden_codec=codec, int8_group=8, hidden_compression=compression,
                    row_kept=kept, max_heads=2)
    c = Cache(tmp_path / "c")
    names = ["hidden"] + (["hidden_scale"] if codec == "int8" else [])
    for name in names:
        assert isinstance(ShardReader.open(c.group[name], tmp_path / "c", name), ShardReader)
    ranges = [(0, c.n_rows), (0, 1), (63, 65), (511, 513), (c.n_rows - 5, c.n_rows)]
    ranges += [tuple(sorted(rng.integers(0, c.n_rows, 2))) for _ in range(30)]
    for lo, hi in ranges:
        if hi > lo:
            assert torch.equal(c.reads.rows(lo, hi, packed=codec == "int8"),
                               c.reads.rows(lo, hi, packed=codec == "int8", direct=False)), (lo, hi)
    assert torch.equal(c.read_hidden(0, c.n_tokens), Cache(tmp_path / "c", direct=False).read_hidden(0, c.n_tokens))


def test_a_truncated_or_missing_shard_is_never_read_as_data(tmp_path):
    n = 1000
    c = from_arrays(tmp_path / "c", torch.randn(n, 16), [0, n], np.zeros(n, np.int64),
                    VocabMapping(np.zeros(4, np.int64), np.ones(4, bool)), layout=Layout(64, 256))
    shard = tmp_path / "c" / shard_key("hidden", 1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])  # one byte short of its checksum
    with pytest.raises(UserError, match=r"shard hidden/c/1/0 \(unit 1, rows 256:512\) fails its index checksum"):
        ShardReader.open(Cache(tmp_path / "c").group["hidden"], tmp_path / "c", "hidden").read(256, 300)
    shard.unlink()  # a missing shard reads as the NaN fill value, as through zarr (and verify names it)
    assert torch.isnan(Cache(tmp_path / "c").read_hidden(250, 300)[6:]).all()
    assert not torch.isnan(Cache(tmp_path / "c").read_hidden(250, 300)[:6]).any()
    assert c.n_tokens == n


@pytest.mark.parametrize("codec,dtype", [("lossless", "bfloat16"), ("lossless", "float32"), ("int8", "float32")])
def test_batches_decoded_straight_into_their_buffers_equal_the_block_reader(tmp_path, monkeypatch, codec, dtype):
    """The loader's direct path (pieces decoded into one buffer per batch) yields exactly the block path's batches."""
    from medusa_cache.loader import epoch_order, make_batches, make_blocks
    from medusa_cache.stream import BatchStream, StreamSource

    rng = np.random.default_rng(1)
    n = 3000
    offsets = np.concatenate([[0], np.cumsum(rng.integers(50, 300, 30))])
    offsets = offsets[offsets < n].tolist() + [n]
    labels = np.where(rng.random(n) < 0.5, rng.integers(0, 20, n), -100)
    from_arrays(tmp_path / "c", torch.randn(n, 32), offsets, labels, VocabMapping(np.zeros(20, np.int64),
                np.ones(20, bool)), hidden_dtype=dtype, layout=Layout(64, 512), hidden_codec=codec, int8_group=8)
    c = Cache(tmp_path / "c")
    blocks = make_blocks(np.arange(c.n_seqs), c.offsets, 700)
    batches = make_batches(epoch_order(blocks, 0, 0, 4), c.offsets, 1, 256)

    def collect(direct: bool) -> list:
        cache = Cache(tmp_path / "c", direct=direct)
        assert cache.reads_into() == direct
        return [(b.hidden, b.targets, b.ahead, b.ahead_idx) for b in
                BatchStream(StreamSource(cache, cache.array("labels"), 3, blocks, packed=codec == "int8",
                                         lookahead=3), batches, start=2)]

    fast, ref = collect(True), collect(False)
    assert len(fast) == len(ref) == len(batches) - 2
    for x, y in zip(fast, ref, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
