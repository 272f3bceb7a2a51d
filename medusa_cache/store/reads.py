"""Reading rows of the hidden states: the direct shard reader for local stores, zarr for URLs or when asked.

The read path is chosen per opened store (``Cache(path, direct=...)``), never globally."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from ..errors import UserError
from .codec import from_stored, int8_decode, int8_pack
from .paths import is_url
from .shards import ShardReader
from .spec import TORCH_DTYPES, ChunkError, StoreMeta, shard_key


class HiddenReads:
    """Stored rows of ``hidden`` (and ``hidden_scale``) of one opened store.

    Local stores are read by ``ShardReader`` (shard files directly, several times faster than zarr's own read path:
    README, tools/bench_storage.py part 4); ``direct=False`` (``verify --deep``, benchmarks) and URLs use zarr."""

    def __init__(self, path: str, group: zarr.Group, meta: Callable[[], StoreMeta], n_rows: int, direct: bool = True):
        self.path, self.group, self._meta, self.n_rows = path, group, meta, n_rows
        self.direct = direct and not is_url(path)
        self._readers: dict[str, ShardReader | None] = {}

    @property
    def meta(self) -> StoreMeta:
        """The owning ``Cache``'s metadata (its one copy)."""
        return self._meta()

    def reader(self, name: str) -> ShardReader | None:
        """The direct reader of a sharded array (None: read through zarr)."""
        if not self.direct:
            return None
        if name not in self._readers:
            self._readers[name] = ShardReader.open(self.group[name], Path(self.path), name)
        return self._readers[name]

    def forget(self) -> None:
        """Drop open shard files and indexes (a writer is about to change them)."""
        self._readers = {}

    def rows(self, start: int, stop: int, packed: bool = False, direct: bool = True) -> torch.Tensor:
        """Stored rows [start, stop): the stored dtype, float32 for int8 (``packed``: ``int8_pack``'s rows)."""
        try:
            arr = self.read("hidden", start, stop, direct)
        except ChunkError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt or missing chunk: name the shard
            self._name_shard(start, stop, e)
            raise UserError(f"{self.path}/hidden: cannot read token rows {start}:{stop} ({e})") from None
        return self._decode(arr, "hidden_scale", start, stop, packed, direct)

    def aux(self, start: int, stop: int) -> torch.Tensor:
        """Stored rows [start, stop) of ``aux_hidden`` (format 6): [rows, A*H], the stored dtype (int8: float32)."""
        return self._decode(self.read("aux_hidden", start, stop), "aux_scale", start, stop)

    def _decode(self, arr: np.ndarray, scale_name: str, start: int, stop: int, packed: bool = False,
                direct: bool = True) -> torch.Tensor:
        """Stored values as tensors: lossless as stored; int8 dequantised to float32 with its scales (vectorised), or
        packed to be decoded where used."""
        if self.meta.hidden_codec == "int8":
            scale = torch.from_numpy(np.ascontiguousarray(self.read(scale_name, start, stop, direct)))
            q = torch.from_numpy(np.ascontiguousarray(arr))
            return int8_pack(q, scale) if packed else int8_decode(q, scale, self.meta.int8_group)
        return from_stored(np.ascontiguousarray(arr), self.meta.hidden_dtype)

    def _name_shard(self, start: int, stop: int, e: Exception) -> None:
        shard = self.meta.shard_tokens
        for k in range(start // shard, (stop - 1) // shard + 1):
            a, b = k * shard, min(self.n_rows, (k + 1) * shard)
            try:
                self.group["hidden"][max(a, start) : min(b, stop)]
            except Exception:  # noqa: BLE001
                raise UserError(f"{self.path}: shard {shard_key('hidden', k)} (token rows {a}:{b}) cannot be read "
                                f"({e}); run `medusa-cache verify --deep`") from None

    def read(self, name: str, start: int, stop: int, direct: bool = True) -> np.ndarray:
        """Rows [start, stop) of a sharded array as stored, every chunk's checksum checked."""
        r = self.reader(name) if direct else None
        if r is not None:
            return r.read(start, stop)
        try:
            return self.group[name][start:stop]
        except Exception as e:  # noqa: BLE001 - zarr's own checks (chunk CRC32C, shard index, decoding)
            a, b = start // self.meta.shard_tokens, (stop - 1) // self.meta.shard_tokens
            units = f"unit {a}" if a == b else f"units {a}..{b}"
            raise ChunkError(f"{self.path}/{name}: rows {start}:{stop} ({units}, shards {shard_key(name, 'K')}) cannot "
                             f"be read ({type(e).__name__}: {e}): a chunk changed on disk or is damaged; `medusa-cache "
                             "verify --deep` names it; re-dump the store (or restore the file)") from None

    def fills_buffers(self) -> bool:
        """Whether ``into`` can fill a caller's buffer without intermediate copies (direct reads of every array)."""
        return self.reader("hidden") is not None and (
            self.meta.hidden_codec != "int8" or self.reader("hidden_scale") is not None)

    def width(self, packed: bool) -> tuple[int, torch.dtype]:
        """(columns, dtype) of what ``rows(..., packed)`` returns."""
        h = self.meta.hidden_size
        if self.meta.hidden_codec == "int8":
            return (h + 4 * (h // self.meta.int8_group), torch.int8) if packed else (h, torch.float32)
        return h, TORCH_DTYPES[self.meta.hidden_dtype]

    def into(self, start: int, stop: int, out: torch.Tensor, packed: bool = False) -> None:
        """``out[:] = rows(start, stop, packed)`` with the chunks decoded straight into ``out`` (``fills_buffers``).

        The loader fills each batch's buffer this way: no per-block read, per-sequence copy or concatenation."""
        hidden = self.reader("hidden")
        if self.meta.hidden_codec == "int8" and packed:
            h = self.meta.hidden_size
            hidden.read(start, stop, out[:, :h].numpy())
            self.reader("hidden_scale").read(start, stop, out[:, h:].view(torch.float32).numpy())
        elif self.meta.hidden_codec == "int8":
            out.copy_(self.rows(start, stop))
        elif self.meta.hidden_dtype == "bfloat16":
            hidden.read(start, stop, out.view(torch.int16).numpy().view(np.uint16))
        else:
            hidden.read(start, stop, out.numpy())
