"""An opened store, read-only: its metadata, which rows and sequences it holds, and the checks every reader makes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import zarr

from ..errors import UserError
from ..vocab import VocabMapping
from .paths import exists, fs_of, is_url
from .reads import HiddenReads
from .rows import seq_of
from .spec import FORMAT_VERSION, SMALL_ARRAYS, STATES, ChunkError, StoreMeta


class Cache:
    """An opened store (train, eval, ablate, inspect, verify read it). ``direct=False`` reads the hidden states
    through zarr instead of the direct shard reader (``HiddenReads``)."""

    def __init__(self, path: str | Path, mode: str = "r", direct: bool = True):
        self.path = str(path)
        if not exists(self.path):
            raise UserError(f"cache not found: {self.path}")
        try:
            self.group = zarr.open_group(self.path, mode=mode)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{self.path}: not a readable Zarr group ({e})") from None
        attrs = dict(self.group.attrs)
        version = attrs.get("medusa_cache")
        if version is None:
            raise UserError(f"{self.path}: not a medusa-cache store (no 'medusa_cache' format attribute)")
        if version > FORMAT_VERSION:
            raise UserError(f"{self.path}: cache format version {version} is newer than this medusa-cache reads "
                            f"({FORMAT_VERSION}); upgrade medusa-cache")
        self.meta = StoreMeta.from_dict(attrs, self.path)  # the one copy of the attributes
        check_metadata(self)
        for name in ("hidden", "seq_offsets"):  # what every reader needs at open: a missing one named, as the others
            if name not in self.group:
                raise ChunkError(f"{self.path}: array {name} is missing (no {name}/zarr.json): the store is damaged: "
                                 "re-dump it (or restore the file)")
        self.hidden = self.group["hidden"]
        self.offsets: np.ndarray = self.stored("seq_offsets")
        self.n_tokens = int(self.offsets[-1])
        self.n_seqs = len(self.offsets) - 1
        self._remapped: tuple[VocabMapping, np.ndarray] | None = None  # remap(): another draft vocabulary
        self.remapped_from: int | None = None  # remap(): the draft vocabulary size the store holds
        self.n_rows = int(self.hidden.shape[0])  # rows of `hidden`: n_tokens, or fewer with keep_rows "needed"
        self.row_kept: np.ndarray | None = None  # bool [N] with keep_rows "needed"
        self.row_start: np.ndarray | None = None  # [N+1]: stored row of token t (when kept) = row_start[t]
        if self.meta.keep_rows == "needed":
            if "row_kept" not in self.group:
                raise UserError(f"{self.path}: keep_rows is 'needed' but array row_kept is missing; the store is "
                                "damaged: re-dump it")
            # a lost chunk reads as 255 and counts as not kept here; require_complete and verify name it
            self.row_kept = self.stored("row_kept") == 1
            self.row_start = np.concatenate([[0], np.cumsum(self.row_kept, dtype=np.int64)])
        self.reads = HiddenReads(self.path, self.group, lambda: self.meta, self.n_rows, direct)

    # ---- metadata (views of ``meta``) and whole arrays -------------------------------------------
    complete = property(lambda self: self.meta.complete)
    hidden_dtype = property(lambda self: self.meta.hidden_dtype)
    codec = property(lambda self: self.meta.hidden_codec)
    int8_group = property(lambda self: self.meta.int8_group)
    hidden_size = property(lambda self: self.meta.hidden_size)
    shard_tokens = property(lambda self: self.meta.shard_tokens)
    n_units = property(lambda self: self.meta.n_units)

    def content_fingerprint(self) -> str:
        """What the store holds: its inputs' fingerprints and its shape (a re-dump of other data differs)."""
        d = {"fingerprints": self.group.attrs.get("fingerprints", {}), "n_tokens": self.n_tokens, "n_seqs": self.n_seqs,
             "hidden_dtype": self.hidden_dtype, "hidden_size": self.hidden_size}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def data_fingerprint(self) -> str:
        """The data the store holds, whatever its draft vocabulary and storage: two dumps of the same rows at two
        vocabulary sizes (or one re-mapped), dtypes or layouts are the same data."""
        how = ("vocab", "vocab_mapping", "dtype", "hidden_codec", "keep_rows", "hidden_compression")  # not what
        fps = {k: v for k, v in self.group.attrs.get("fingerprints", {}).items() if k not in how}
        d = {"fingerprints": fps, "n_tokens": self.n_tokens, "n_seqs": self.n_seqs}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def mapping(self) -> VocabMapping:
        if self._remapped is not None:
            return self._remapped[0]
        return VocabMapping(self.stored("d2t").astype(np.int64), self.stored("t2d").astype(bool))

    def array(self, name: str) -> np.ndarray:
        """A whole small array as readers see it (``labels`` re-mapped after ``remap``)."""
        if name == "labels" and self._remapped is not None:
            return self._remapped[1]
        return self.stored(name)

    def stored(self, name: str) -> np.ndarray:
        """A whole array as stored, every chunk checksum-checked (format 5) and any failure named."""
        if name not in self.group:
            raise ChunkError(f"{self.path}: array {name} is missing (no {name}/zarr.json): the store is damaged: "
                             "re-dump it (or restore the file)")
        try:
            return self.group[name][:]
        except Exception as e:  # noqa: BLE001 - a chunk that fails its checksum or cannot be decoded
            raise ChunkError(f"{self.path}/{name}: cannot be read ({type(e).__name__}: {e}); a chunk changed on disk "
                             "or is damaged: `medusa-cache verify` names it; re-dump the store (or restore the file)"
                             ) from None

    def remap(self, mapping: VocabMapping) -> Cache:
        """Read this cache with another draft vocabulary (same target vocabulary): ``mapping()`` returns it and the
        labels are derived from ``input_ids`` and ``loss_mask`` as the dump derives them (``VocabMapping.labels``),
        so everything downstream sees what a dump with ``mapping`` would have stored. Nothing is written."""
        if mapping.target_size != self.meta.vocab_size:
            raise UserError(f"{self.path}: a draft vocabulary over {mapping.target_size} target ids cannot re-map a "
                            f"cache of vocabulary size {self.meta.vocab_size}")
        labels = mapping.labels(self.stored("input_ids"), self.stored("loss_mask").astype(bool))
        self._remapped = (mapping, labels)
        self.remapped_from = self.meta.draft_vocab_size
        self.meta = dataclasses.replace(self.meta, draft_vocab_size=mapping.draft_size)
        return self

    # ---- rows, units and sequences ----------------------------------------------------------------
    def unit_range(self, k: int) -> tuple[int, int]:
        """Rows of `hidden` in unit k (= token rows, unless keep_rows is "needed")."""
        return k * self.shard_tokens, min(self.n_rows, (k + 1) * self.shard_tokens)

    def unit_tokens(self, k: int) -> tuple[int, int]:
        """Token rows [a, b) whose stored rows are unit k's (the tokens the dump computes for it)."""
        a, b = self.unit_range(k)
        if self.row_start is None:
            return a, b
        return self.token_of_row(a), self.token_of_row(b - 1) + 1

    def token_of_row(self, r):
        """Token index of stored row(s) ``r`` (identity unless keep_rows is "needed")."""
        if self.row_start is None:
            return r
        t = np.searchsorted(self.row_start, np.asarray(r), side="right") - 1
        return int(t) if np.ndim(t) == 0 else t

    def done_units(self) -> np.ndarray:
        return self.stored("unit_done").astype(bool)

    def usable_seqs(self, allow_partial: bool = False, warn: bool = True) -> np.ndarray:
        """The sequences any reader may use: not holding NaN/Inf rows, and (partial stores) fully dumped.

        Training, validation, ``eval`` and ``ablate`` all read through this one function."""
        seqs = np.arange(self.n_seqs)
        bad = self.bad_seqs()
        if len(bad):
            if warn:
                print(f"warning: {len(bad)} sequences with NaN/Inf hidden states are excluded ({self.path})",
                      file=sys.stderr)
            seqs = np.setdiff1d(seqs, bad)
        if not self.complete and allow_partial:
            done = self.done_units()
            so = self.offsets if self.row_start is None else self.row_start[self.offsets]  # stored rows per seq
            a_unit = np.minimum(so[:-1] // self.shard_tokens, self.n_units - 1)
            b_unit = (np.maximum(so[1:], 1) - 1) // self.shard_tokens
            seqs = seqs[done[a_unit[seqs]] & done[b_unit[seqs]]]
        return seqs

    def bad_seqs(self) -> np.ndarray:
        """Sequences with a NaN/Inf hidden row (recorded by the dump; excluded from training)."""
        if "bad_rows" not in self.group:
            return np.zeros(0, dtype=np.int64)
        flags = self.stored("bad_rows")
        if not self.complete:  # rows of units not dumped yet read as the fill value
            flags = np.where(np.repeat(self.done_units(), self.shard_tokens)[: self.n_rows], flags, 0)
        return np.unique(seq_of(self.offsets, self.token_of_row(np.flatnonzero(flags))))

    # ---- the checks every reader makes -------------------------------------------------------------
    def require_reach(self, num_heads: int, flag: str = "--num-heads") -> None:
        """Refuse more heads than the stored rows serve (``dump --keep-rows needed --max-heads K``)."""
        k = self.meta.max_heads
        if k and num_heads > k:
            raise UserError(f"{flag} {num_heads}: {self.path} stores hidden rows for at most {k} heads "
                            f"(dumped with --keep-rows needed --max-heads {k}); use at most {k} heads, or re-dump with "
                            f"--max-heads {num_heads} (or --keep-rows all)")

    def require_compatible(self, model: str | None, hidden_size: int, num_heads: int, whose: str, flag: str = "--cache",
                           heads_flag: str = "--num-heads", why: str = "") -> None:
        """The one check that heads, or another cache, go with this cache: the same model (fingerprint), the same
        hidden size, and stored rows for that many heads. ``whose``: what it is checked against, in words."""
        if model and model != self.meta.fingerprints.get("model"):
            raise UserError(f"{flag}: {self.path} was dumped with another model than {whose} (model fingerprints "
                            f"differ){why}")
        if hidden_size != self.hidden_size:
            raise UserError(f"{flag}: {self.path} has hidden size {self.hidden_size}, {whose} {hidden_size}")
        self.require_reach(num_heads, heads_flag)

    # ---- hidden states -----------------------------------------------------------------------------
    def read_hidden(self, start: int, stop: int, packed: bool = False) -> torch.Tensor:
        """Token rows [start, stop) of the hidden states: the stored dtype, float32 for int8 (``packed``: int8 rows
        of ``int8_pack``, decoded later by ``int8_unpack``, e.g. on the training device).

        With keep_rows "needed", a row that is not stored reads as 0: no reader with at most ``max_heads`` heads uses
        it (its targets are all ignored; ``require_reach`` refuses more heads)."""
        if self.row_start is None:
            return self.reads.rows(start, stop, packed)
        rows = self.reads.rows(int(self.row_start[start]), int(self.row_start[stop]), packed)
        out = torch.zeros((stop - start, rows.shape[1]), dtype=rows.dtype)
        out[torch.from_numpy(self.row_kept[start:stop])] = rows
        return out

    def read_aux(self, start: int, stop: int) -> torch.Tensor:
        """Token rows [start, stop) of the auxiliary layers (format 6, all rows stored): [rows, A*H], layer j in
        columns [j*H, (j+1)*H); the stored dtype, float32 for int8 (callers check ``meta.aux_layers`` first)."""
        return self.reads.aux(start, stop)

    def reads_into(self) -> bool:
        """Whether ``reads.into`` can fill a caller's buffer with token rows directly (local, all rows stored)."""
        return self.row_start is None and self.reads.fills_buffers()

    def disk_bytes(self) -> int:
        if is_url(self.path):
            fs, p = fs_of(self.path)
            return int(fs.du(p))
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())


def check_metadata(cache: Cache) -> None:
    """Every array's zarr.json parses, or the damaged one is named (a missing array is named by verify)."""
    for name in (*STATES, *SMALL_ARRAYS):  # every array's metadata parses, or it is named
        try:
            cache.group[name]
        except KeyError:
            pass  # a missing array: `verify` names it, readers fail on it by name
        except Exception as e:  # noqa: BLE001 - a zarr.json cut short or edited
            raise UserError(f"{cache.path}/{name}/zarr.json: the array's metadata cannot be read "
                            f"({type(e).__name__}: {e}); the store is damaged: re-dump it (or restore the file)"
                            ) from None
