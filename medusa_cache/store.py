"""The cache store: the only module that knows the Zarr layout (spec: docs/cache-format.md).

One Zarr v3 group. Sequences are packed end to end along a token axis of length N; nothing is padded.
Token-axis arrays share one shard size, ``shard_tokens``. The hidden states are written one *unit* at
a time, a unit being exactly one shard of ``hidden`` (token rows ``[k*shard_tokens, (k+1)*shard_tokens)``),
so each writer owns whole shards and two writers can never rewrite each other's shard. Everything
else (ids, mask, labels, offsets, vocab mapping) is known after tokenisation and written once, before
any unit, by one process. Unit ``k`` is marked done in ``unit_done[k]`` (one chunk per unit, so ranks
never share a chunk) only after its shard is written; the ``complete`` attribute is set last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from .errors import UserError
from .vocab import VocabMapping

FORMAT_VERSION = 1
HIDDEN_DTYPES = {"bfloat16": np.uint16, "float32": np.float32}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Layout:
    chunk_tokens: int
    shard_tokens: int

    @staticmethod
    def default(hidden_size: int, itemsize: int, max_length: int) -> Layout:
        """~1 MiB chunks; shards of >= 16 max-length sequences (<= 2% recompute at unit edges), <= 512 MiB."""
        chunk = 1 << max(6, int(np.log2(max(1, (1 << 20) // (hidden_size * itemsize)))))
        shard = chunk
        while shard < 16 * max_length and shard * 2 * hidden_size * itemsize <= (512 << 20):
            shard *= 2
        return Layout(chunk, shard)


def _blosc(typesize: int) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=typesize)


def is_url(path: str | Path) -> bool:
    """An fsspec URL (s3://, gs://, memory://, file://...) rather than a local path."""
    return "://" in str(path)


def _fs(path: str | Path):
    import fsspec

    return fsspec.core.url_to_fs(str(path))  # (filesystem, path inside it); credentials from its environment


def exists(path: str | Path) -> bool:
    if is_url(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return Path(path).exists()


def is_empty(path: str | Path) -> bool:
    """Missing, or a directory with nothing in it."""
    if is_url(path):
        fs, p = _fs(path)
        return not fs.exists(p) or not fs.ls(p)
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def _read_text(path: str) -> str | None:
    try:
        if is_url(path):
            fs, p = _fs(path)
            return fs.cat_file(p).decode()
        return Path(path).read_text()
    except (OSError, FileNotFoundError):
        return None


def is_store(path: str | Path, partial: bool = False) -> bool:
    """A medusa-cache store; with ``partial``, also one whose preparation was interrupted."""
    text = _read_text(f"{str(path).rstrip('/')}/zarr.json")
    if text is None:
        return False
    try:
        attrs = json.loads(text).get("attributes", {})
    except json.JSONDecodeError:
        return False
    return "medusa_cache" in attrs or (partial and "medusa_cache_preparing" in attrs)


def remove_store(path: str | Path) -> None:
    """--overwrite: remove an existing store, but never a directory that is not one of ours."""
    if is_empty(path):
        return
    if not is_store(path, partial=True):
        raise UserError(f"--overwrite: {path} exists and is not a medusa-cache store; refusing to delete it")
    if is_url(path):
        fs, p = _fs(path)
        fs.rm(p, recursive=True)
    else:
        shutil.rmtree(path)


def create(
    path: str | Path,
    *,
    hidden_size: int,
    hidden_dtype: str,
    layout: Layout,
    input_ids: np.ndarray,
    loss_mask: np.ndarray,
    labels: np.ndarray,
    offsets: np.ndarray,
    sources: np.ndarray,
    mapping: VocabMapping,
    token_counts: np.ndarray,
    attrs: dict[str, Any],
) -> Cache:
    n = int(offsets[-1])
    group = zarr.open_group(str(path), mode="w", attributes={"medusa_cache_preparing": True})
    tok = dict(chunks=(layout.chunk_tokens,), shards=(layout.shard_tokens,))
    for name, data in (("input_ids", input_ids.astype(np.int32)), ("loss_mask", loss_mask.astype(np.uint8)),
                       ("labels", labels.astype(np.int32))):
        a = group.create_array(name, shape=(n,), dtype=data.dtype, compressors=[_blosc(data.itemsize)], **tok)
        a[:] = data
    group.create_array("seq_offsets", data=offsets.astype(np.int64), chunks=(max(1, len(offsets)),))
    group.create_array("seq_source", data=sources.astype(np.int64), chunks=(max(1, len(sources)), 2))
    group.create_array("d2t", data=mapping.d2t, chunks=(max(1, mapping.draft_size),))
    group.create_array("t2d", data=mapping.t2d, chunks=(max(1, mapping.target_size),))
    group.create_array("token_counts", data=token_counts.astype(np.int64), chunks=(max(1, len(token_counts)),))
    np_dtype = HIDDEN_DTYPES[hidden_dtype]
    itemsize = np.dtype(np_dtype).itemsize
    group.create_array(
        "hidden",
        shape=(n, hidden_size),
        dtype=np_dtype,
        chunks=(layout.chunk_tokens, hidden_size),
        shards=(layout.shard_tokens, hidden_size),
        compressors=[_blosc(itemsize)],
        fill_value=0,
        attributes={"logical_dtype": hidden_dtype},
    )
    group.create_array("bad_rows", shape=(n,), dtype=np.uint8, compressors=[_blosc(1)], fill_value=0, **tok)
    n_units = max(1, -(-n // layout.shard_tokens))
    group.create_array("unit_done", shape=(n_units,), dtype=np.uint8, chunks=(1,), compressors=None, fill_value=0)
    group.attrs.update(
        {
            "medusa_cache": FORMAT_VERSION,
            "hidden_size": hidden_size,
            "hidden_dtype": hidden_dtype,
            "chunk_tokens": layout.chunk_tokens,
            "shard_tokens": layout.shard_tokens,
            "n_units": n_units,
            "complete": False,
            **attrs,
        }
    )
    return Cache(path, mode="r+")


class Cache:
    """An opened store. ``mode='r'`` for readers (train/eval/inspect), ``'r+'`` for the dump."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = str(path)
        if not exists(self.path):
            raise UserError(f"cache not found: {self.path}")
        try:
            self.group = zarr.open_group(self.path, mode=mode)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.path}: not a readable Zarr group ({e})") from None
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        version = self.attrs.get("medusa_cache")
        if version is None:
            raise UserError(f"{self.path}: not a medusa-cache store (no 'medusa_cache' format attribute)")
        if version > FORMAT_VERSION:
            raise UserError(
                f"{self.path}: cache format version {version} is newer than this medusa-cache reads "
                f"({FORMAT_VERSION}); upgrade medusa-cache"
            )
        self.hidden = self.group["hidden"]
        self.hidden_dtype: str = self.attrs["hidden_dtype"]
        self.hidden_size: int = self.attrs["hidden_size"]
        self.shard_tokens: int = self.attrs["shard_tokens"]
        self.n_units: int = self.attrs["n_units"]
        self.offsets: np.ndarray = self.group["seq_offsets"][:]
        self.n_tokens = int(self.offsets[-1])
        self.n_seqs = len(self.offsets) - 1

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def mapping(self) -> VocabMapping:
        return VocabMapping(self.group["d2t"][:].astype(np.int64), self.group["t2d"][:].astype(bool))

    def array(self, name: str) -> np.ndarray:
        return self.group[name][:]

    def unit_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_tokens, min(self.n_tokens, (k + 1) * self.shard_tokens)

    def done_units(self) -> np.ndarray:
        return self.group["unit_done"][:].astype(bool)

    def require_complete(self, allow_partial: bool = False) -> None:
        if not self.complete and not allow_partial:
            done = int(self.done_units().sum())
            raise UserError(
                f"{self.path}: cache is incomplete ({done}/{self.n_units} units dumped); finish it with "
                "`medusa-cache dump ... --resume`, or pass --allow-partial"
            )

    # ---- hidden states --------------------------------------------------------------------------
    def read_hidden(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the hidden states as a torch tensor in the stored dtype."""
        try:
            arr = self.hidden[start:stop]
        except Exception as e:  # noqa: BLE001 - a corrupt or missing chunk: name the shard
            for k in range(start // self.shard_tokens, (stop - 1) // self.shard_tokens + 1):
                a, b = self.unit_range(k)
                try:
                    self.hidden[max(a, start) : min(b, stop)]
                except Exception:  # noqa: BLE001
                    raise UserError(f"{self.path}: shard hidden/c/{k}/0 (token rows {a}:{b}) cannot be read "
                                    f"({e}); run `medusa-cache verify --deep`") from None
            raise UserError(f"{self.path}/hidden: cannot read token rows {start}:{stop} ({e})") from None
        return from_stored(np.ascontiguousarray(arr), self.hidden_dtype)

    def write_unit(self, k: int, hidden: torch.Tensor) -> int:
        """Write unit k's rows (and its shard of ``bad_rows``: rows holding NaN/Inf). Returns #bad rows."""
        a, b = self.unit_range(k)
        assert hidden.shape == (b - a, self.hidden_size), (hidden.shape, a, b)
        bad = (~torch.isfinite(hidden).all(dim=1)).numpy().astype(np.uint8)
        self.hidden[a:b] = to_stored(hidden, self.hidden_dtype)
        if "bad_rows" in self.group:
            self.group["bad_rows"][a:b] = bad
        self._fsync_local(f"hidden/c/{k}/0")
        return int(bad.sum())

    def bad_seqs(self) -> np.ndarray:
        """Sequences with a NaN/Inf hidden row (recorded by the dump; excluded from training)."""
        if "bad_rows" not in self.group:
            return np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(self.group["bad_rows"][:])
        return np.unique(np.searchsorted(self.offsets, rows, side="right") - 1)

    def mark_done(self, k: int) -> None:
        self.group["unit_done"][k] = 1
        self._fsync_local(f"unit_done/c/{k}")

    def set_attrs(self, **kw: Any) -> None:
        self.group.attrs.update(kw)
        self.attrs.update(kw)

    def _fsync_local(self, key: str) -> None:
        if is_url(self.path):
            return  # object stores publish a whole object or nothing
        p = Path(self.path) / key
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def disk_bytes(self) -> int:
        if is_url(self.path):
            fs, p = _fs(self.path)
            return int(fs.du(p))
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())


def to_stored(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return hidden.to(torch.float32).contiguous().numpy()


def from_stored(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
