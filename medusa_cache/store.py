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

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from .errors import UserError
from .vocab import VocabMapping, build_mapping

FORMAT_VERSION = 5  # 2: fill values that cannot pass as data; 3: optional int8 hidden codec (hidden_scale);
# 4: optional needed-rows layout (keep_rows = "needed": `hidden` holds only the rows `row_kept` marks);
# 5: every chunk of every array ends with a CRC32C of its bytes (zarr's crc32c codec, last in the chain), which
#    every read checks: a byte changed on disk is a named error, never data (older stores read as before)
HIDDEN_DTYPES = {"bfloat16": np.uint16, "float32": np.float32}
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Fill values that cannot pass as data (format 2): zarr returns the fill value for a chunk that is not in
# the store, so a lost chunk reads as NaN / -1 / 255, never as plausible zeros. Every chunk is written
# (write_empty_chunks), so a chunk missing from the store's listing is always a loss.
HIDDEN_FILL = {"bfloat16": 0x7FC0, "float32": float("nan")}  # 0x7FC0: the bf16 quiet-NaN bit pattern
FILL = {"input_ids": -1, "loss_mask": 255, "labels": -2, "seq_offsets": -1, "seq_source": -1, "d2t": -1,
        "token_counts": -1, "bad_rows": 255, "row_kept": 255}
ARRAYS = ("hidden", "hidden_scale", "bad_rows", "input_ids", "loss_mask", "labels", "seq_offsets", "seq_source", "d2t",
          "t2d", "token_counts", "unit_done", "row_kept")
PER_UNIT = ("hidden", "hidden_scale", "bad_rows", "unit_done")  # written unit by unit: only done units' chunks
INT8_FILL = -128  # symmetric quantisation writes -127..127 only, so a lost int8 chunk cannot pass as data
_WRITE_ALL = {"array.write_empty_chunks": True}


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


@dataclass
class StoreMeta:
    """The group attributes of a store: every one named, typed and documented here, validated on open."""

    medusa_cache: int
    """Format version (1..FORMAT_VERSION)."""
    hidden_size: int
    """H: width of the hidden states."""
    hidden_dtype: str
    """Compute dtype of the dump, and stored dtype of lossless states: bfloat16 (stored as uint16) or float32."""
    chunk_tokens: int
    """Rows per Zarr chunk of the token-axis arrays."""
    shard_tokens: int
    """Rows per shard = per write unit."""
    n_units: int
    """Number of units (shards of `hidden`)."""
    complete: bool = False
    """Set last, when every unit is done."""
    vocab_size: int = 0
    """Target vocabulary size V."""
    draft_vocab_size: int = 0
    """Draft vocabulary size D."""
    hidden_codec: str = "lossless"
    """lossless or int8 (format 3)."""
    int8_group: int = 0
    """int8: channels per scale."""
    keep_rows: str = "all"
    """all (a hidden row per token) or needed (format 4: only rows a head up to `max_heads` can use; `row_kept`)."""
    max_heads: int = 0
    """keep_rows needed: the largest number of heads the stored rows serve (train/eval/ablate refuse more); 0 = any."""
    pipeline: str = "medusa-cache"
    """How chats became ids and masks: medusa-cache or specforge (docs/data-pipeline.md)."""
    data_files: list = field(default_factory=list)
    """Names of the data files, in `seq_source` order."""
    fingerprints: dict = field(default_factory=dict)
    """model, tokenizer, chat_template, data, vocab, ...: what a resume must match."""
    dump_args: dict = field(default_factory=dict)
    """The dump's resolved settings."""
    counts: dict = field(default_factory=dict)
    """rows, sequences, tokens, assistant tokens, skipped rows, ... (docs/cache-format.md)."""
    bad_row_examples: list = field(default_factory=list)
    """First skipped input rows' messages."""
    medusa_cache_preparing: bool = False
    """True while the dump prepares the store (then it is only resumable from scratch)."""

    @staticmethod
    def from_attrs(attrs: dict[str, Any], where: str) -> StoreMeta:
        import dataclasses
        import typing

        hints = typing.get_type_hints(StoreMeta)
        known = {f.name for f in dataclasses.fields(StoreMeta)}
        values = {k: v for k, v in attrs.items() if k in known}
        for k, v in values.items():
            want = hints[k]
            want = typing.get_origin(want) or want
            if want is float and isinstance(v, int):
                continue
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise UserError(f"{where}: attribute {k!r} should be {want.__name__}, found {v!r}")
        try:
            return StoreMeta(**values)
        except TypeError as e:
            raise UserError(f"{where}: store attributes incomplete ({e})") from None


def _blosc(typesize: int, cname: str = "zstd") -> BloscCodec:
    return BloscCodec(cname=cname, clevel=3 if cname == "zstd" else 1, shuffle="bitshuffle", typesize=typesize)


def _chain(typesize: int, cname: str | None = "zstd") -> list:
    """A chunk's bytes-to-bytes codecs (format 5): Blosc (``cname`` None: none), then a CRC32C of the result."""
    from zarr.codecs import Crc32cCodec

    return ([_blosc(typesize, cname)] if cname else []) + [Crc32cCodec()]



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


class WriterLock:
    """One writer at a time per local output directory: an exclusive ``flock`` on the directory itself.

    Held by rank 0 for the whole run of the command (dump, train, ablate); a second command writing the same
    ``--out`` is refused at once, whenever it starts. The kernel drops the lock when its process dies, so a crashed
    run never leaves a stale lock behind. The directory is never deleted or recreated while locked (``create`` and
    ``--overwrite`` empty it in place), or the lock would be left on a removed directory. (Object stores have no
    locks: there, do not start two dumps into one URL.) A directory created only to be locked is removed again if
    the command refuses before writing.
    """

    def __init__(self, path: str | Path, command: str = "dump"):
        self.fd: int | None = None
        self.created = False
        self.path = Path(path)
        if is_url(path):
            return
        import fcntl

        if not self.path.exists():
            try:
                self.path.mkdir(parents=True)
            except OSError as e:
                raise UserError(f"--out: cannot create {path}: {e.strerror}") from None
            self.created = True
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            hint = "then use --resume" if command in ("dump", "train") else "or use another --out"
            raise UserError(f"--out: another medusa-cache command is writing {path} right now (a {command} may not "
                            f"share it); wait for it to finish (or stop it), {hint}") from None

    def release(self, failed: bool = False) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if failed and self.created and self.path.exists() and not any(self.path.iterdir()):
            self.path.rmdir()


def remove_store(path: str | Path) -> None:
    """--overwrite: remove an existing store, but never a directory that is not one of ours."""
    if is_empty(path):
        return
    if not is_store(path, partial=True):
        raise UserError(f"--overwrite: {path} exists and is not a medusa-cache store; refusing to delete it")
    if is_url(path):
        fs, p = _fs(path)
        fs.rm(p, recursive=True)
    else:  # empty the directory but keep it: the dump's WriterLock is held on it
        empty_dir(Path(path))


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` but keep the directory itself: a ``WriterLock`` held on it stays valid
    (deleting and recreating the directory would leave the lock on a removed inode)."""
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def needed_rows(loss_mask: np.ndarray, offsets: np.ndarray, max_heads: int) -> np.ndarray:
    """Which token rows a reader with up to ``max_heads`` heads can use (``dump --keep-rows needed``).

    Row t is needed when any token t-K+1 .. t+K+1 of its own sequence is an assistant token (K = max_heads):
    heads at t train on t+2..t+K+1, ``eval`` scores t when t+1 is an assistant token, and ``eval --base-model``
    and ``--distill`` read the base model's choice from rows t+1..t+K of a scored position."""
    return any_in_window(np.asarray(loss_mask).astype(bool), offsets, 1 - max_heads, max_heads + 2)


def any_in_window(flags: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """bool [N]: any of ``flags[t+lo : t+hi]`` inside t's own sequence, for every row t (vectorised, one cumsum)."""
    c = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    t = np.arange(len(flags))
    seq = np.searchsorted(offsets, t, side="right") - 1
    a = np.clip(t + lo, offsets[seq], offsets[seq + 1])
    b = np.clip(t + hi, offsets[seq], offsets[seq + 1])
    return c[b] - c[a] > 0


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
    hidden_codec: str = "lossless",
    int8_group: int = 128,
    hidden_compression: str = "zstd",
    row_kept: np.ndarray | None = None,
    max_heads: int = 0,
) -> Cache:
    """Preallocate a store. With ``row_kept`` (bool [N], see ``needed_rows``) ``hidden`` holds only those rows, in
    token order (format 4, ``keep_rows = "needed"``); ``hidden_scale`` and ``bad_rows`` follow ``hidden``.
    ``hidden_codec="int8"`` stores hidden states as int8 with one float32 scale per ``int8_group`` channels of each
    row (``hidden_scale``, sharded and written with its unit).

    Long on purpose: every array of the format is declared here, once, next to the others (docs/cache-format.md
    mirrors this function)."""
    import dataclasses

    unknown = set(attrs) - {f.name for f in dataclasses.fields(StoreMeta)}
    if unknown:
        raise ValueError(f"store.create: attributes not in StoreMeta: {sorted(unknown)}")
    n = int(offsets[-1])
    m = n if row_kept is None else int(np.count_nonzero(row_kept))  # rows of `hidden`
    with zarr.config.set(_WRITE_ALL):
        # an existing (empty, locked) directory is kept: mode "w" would delete and recreate it under the lock
        mode = "a" if not is_url(path) and Path(path).is_dir() else "w"
        if mode == "a":  # what mode "w" would do, in place: a store left half-prepared by a kill is started over
            empty_dir(Path(path))
        group = zarr.open_group(str(path), mode=mode, attributes={"medusa_cache_preparing": True})
        tok = dict(chunks=(layout.chunk_tokens,), shards=(layout.shard_tokens,))
        for name, data in (("input_ids", input_ids.astype(np.int32)), ("loss_mask", loss_mask.astype(np.uint8)),
                           ("labels", labels.astype(np.int32))):
            a = group.create_array(name, shape=(n,), dtype=data.dtype, compressors=_chain(data.itemsize),
                                   fill_value=FILL[name], **tok)
            a[:] = data
        for name, data, chunks in (
            ("seq_offsets", offsets.astype(np.int64), (max(1, len(offsets)),)),
            ("seq_source", sources.astype(np.int64), (max(1, len(sources)), 2)),
            ("d2t", mapping.d2t.astype(np.int64), (max(1, mapping.draft_size),)),
            ("token_counts", token_counts.astype(np.int64), (max(1, len(token_counts)),)),
        ):
            a = group.create_array(name, shape=data.shape, dtype=np.int64, chunks=chunks, fill_value=FILL[name],
                                   compressors=_chain(8))
            a[...] = data
        t2d = group.create_array("t2d", shape=mapping.t2d.shape, dtype=bool, chunks=(max(1, mapping.target_size),),
                                 compressors=_chain(1))
        t2d[:] = mapping.t2d
        if row_kept is not None:
            if len(row_kept) != n or m == 0:
                raise ValueError("store.create: row_kept must be [N] and keep at least one row")
            a = group.create_array("row_kept", shape=(n,), dtype=np.uint8, compressors=_chain(1),
                                   fill_value=FILL["row_kept"], **tok)
            a[:] = np.asarray(row_kept).astype(np.uint8)
        if hidden_codec == "int8":
            if hidden_size % int8_group:
                raise UserError(f"--int8-group: {int8_group} does not divide the hidden size {hidden_size}")
            np_dtype, fill = np.int8, INT8_FILL
            g = hidden_size // int8_group
            group.create_array("hidden_scale", shape=(m, g), dtype=np.float32, chunks=(layout.chunk_tokens, g),
                               shards=(layout.shard_tokens, g), compressors=_chain(4), fill_value=float("nan"))
        else:
            np_dtype, fill = HIDDEN_DTYPES[hidden_dtype], HIDDEN_FILL[hidden_dtype]
        itemsize = np.dtype(np_dtype).itemsize
        group.create_array(
            "hidden",
            shape=(m, hidden_size),
            dtype=np_dtype,
            chunks=(layout.chunk_tokens, hidden_size),
            shards=(layout.shard_tokens, hidden_size),
            compressors=_chain(itemsize, None if hidden_compression == "none" else hidden_compression),
            fill_value=fill,
            attributes={"logical_dtype": hidden_dtype, "codec": hidden_codec},
        )
        group.create_array("bad_rows", shape=(m,), dtype=np.uint8, compressors=_chain(1),
                           fill_value=FILL["bad_rows"], **tok)
        n_units = max(1, -(-m // layout.shard_tokens))
        group.create_array("unit_done", shape=(n_units,), dtype=np.uint8, chunks=(1,), compressors=_chain(1, None),
                           fill_value=0)
    group.attrs.update(
        {
            "medusa_cache": FORMAT_VERSION,
            "hidden_size": hidden_size,
            "hidden_dtype": hidden_dtype,
            "chunk_tokens": layout.chunk_tokens,
            "shard_tokens": layout.shard_tokens,
            "n_units": n_units,
            "complete": False,
            "medusa_cache_preparing": False,  # preparation finished: from here on it is a (resumable) store
            "hidden_codec": hidden_codec,
            **({"int8_group": int8_group} if hidden_codec == "int8" else {}),
            **({"keep_rows": "needed", "max_heads": int(max_heads)} if row_kept is not None else {}),
            **attrs,
        }
    )
    return Cache(path, mode="r+")


def from_arrays(path: str | Path, hidden: torch.Tensor, offsets, labels, mapping: VocabMapping, *,
                input_ids=None, loss_mask=None, hidden_dtype: str = "float32", layout: Layout | None = None,
                hidden_codec: str = "lossless", int8_group: int = 128, hidden_compression: str = "zstd",
                complete: bool = True, row_kept: np.ndarray | None = None, max_heads: int = 0,
                attrs: dict[str, Any] | None = None) -> Cache:
    """A whole store from arrays already in memory: the one builder tests and tools use for synthetic caches.

    ``labels`` are draft ids or IGNORE; ``input_ids`` default to the labels' target ids (0 where ignored) and
    ``loss_mask`` to ``labels != IGNORE``. Every unit is written and marked done; ``complete`` sets the flag.
    ``hidden`` has a row per token; with ``row_kept`` only those rows are stored.
    """
    from .vocab import IGNORE

    offsets = np.asarray(offsets, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int32)
    if input_ids is None:
        input_ids = np.where(labels == IGNORE, 0, mapping.draft_to_target[np.maximum(labels, 0)])
    if loss_mask is None:
        loss_mask = labels != IGNORE
    c = create(path, hidden_size=hidden.shape[1], hidden_dtype=hidden_dtype, layout=layout or Layout(64, 256),
               input_ids=np.asarray(input_ids), loss_mask=np.asarray(loss_mask), labels=labels, offsets=offsets,
               sources=np.zeros((len(offsets) - 1, 2)), mapping=mapping,
               token_counts=np.zeros(mapping.target_size),
               attrs={"vocab_size": mapping.target_size, "draft_vocab_size": mapping.draft_size,
                      "fingerprints": {"model": "synthetic"}, **(attrs or {})},
               hidden_codec=hidden_codec, int8_group=int8_group, hidden_compression=hidden_compression,
               row_kept=row_kept, max_heads=max_heads)
    if row_kept is not None:
        hidden = hidden[torch.from_numpy(np.asarray(row_kept, dtype=bool))]
    for k in range(c.n_units):
        a, b = c.unit_range(k)
        c.write_unit(k, hidden[a:b])
        c.mark_done(k)
    if complete:
        c.set_attrs(complete=True)
    return c


class Cache:
    """An opened store. ``mode='r'`` for readers (train/eval/inspect), ``'r+'`` for the dump."""

    direct_reads = True  # ShardReader for local stores; tools/bench_storage.py turns it off to measure zarr's path

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
        self.meta = StoreMeta.from_attrs(self.attrs, self.path)
        for name in ("hidden", *SMALL_ARRAYS, "hidden_scale"):  # every array's metadata parses, or it is named
            try:
                self.group[name]
            except KeyError:
                pass  # a missing array: `verify` names it, readers fail on it by name
            except Exception as e:  # noqa: BLE001 - a zarr.json cut short or edited
                raise UserError(f"{self.path}/{name}/zarr.json: the array's metadata cannot be read "
                                f"({type(e).__name__}: {e}); the store is damaged: re-dump it (or restore the file)"
                                ) from None
        self.hidden = self.group["hidden"]
        self.hidden_dtype: str = self.meta.hidden_dtype
        self.codec: str = self.meta.hidden_codec
        self.int8_group: int = self.meta.int8_group
        self.hidden_size: int = self.meta.hidden_size
        self.shard_tokens: int = self.meta.shard_tokens
        self.n_units: int = self.meta.n_units
        self.offsets: np.ndarray = self.stored("seq_offsets")
        self.n_tokens = int(self.offsets[-1])
        self.n_seqs = len(self.offsets) - 1
        self._readers: dict[str, ShardReader | None] = {}
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

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self.meta.complete

    def content_fingerprint(self) -> str:
        """What the store holds: its inputs' fingerprints and its shape (a re-dump of other data differs)."""
        import hashlib

        d = {"fingerprints": self.meta.fingerprints, "n_tokens": self.n_tokens, "n_seqs": self.n_seqs,
             "hidden_dtype": self.hidden_dtype, "hidden_size": self.hidden_size}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def mapping(self) -> VocabMapping:
        if self._remapped is not None:
            return self._remapped[0]
        return VocabMapping(self.stored("d2t").astype(np.int64), self.stored("t2d").astype(bool))

    def array(self, name: str) -> np.ndarray:
        if name == "labels" and self._remapped is not None:
            return self._remapped[1]
        return self.stored(name)

    def stored(self, name: str) -> np.ndarray:
        """A whole array as stored, every chunk checksum-checked (format 5) and any failure named."""
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

    def top_mapping(self, draft_vocab_size: int, flag: str = "--draft-vocab-size") -> VocabMapping:
        """The draft vocabulary ``dump --draft-vocab-size N`` would have built from this data: Eagle3's top-N of the
        stored ``token_counts`` (assistant tokens), same rule and tie-break (``vocab.build_mapping``)."""
        if draft_vocab_size > self.meta.vocab_size:
            raise UserError(f"{flag} {draft_vocab_size} is larger than the model's vocabulary "
                            f"({self.meta.vocab_size}); give at most {self.meta.vocab_size}")
        return build_mapping(self.stored("token_counts"), draft_vocab_size)

    def coverage(self, sizes: list[int]) -> dict[int, float]:
        """Fraction of this cache's assistant tokens inside each size's top-N draft vocabulary (built from this
        cache's own counts): the ceiling of any head's top-1."""
        counts = np.sort(self.stored("token_counts").astype(np.int64))[::-1]
        total = max(1, int(counts.sum()))
        cum = np.cumsum(counts)
        return {n: float(cum[min(n, len(cum)) - 1] / total) for n in sizes}

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

    def stored_offsets(self) -> np.ndarray:
        """Sequence s's stored rows are [stored_offsets[s], stored_offsets[s+1])."""
        return self.offsets if self.row_start is None else self.row_start[self.offsets]

    def require_reach(self, num_heads: int, flag: str = "--num-heads") -> None:
        """Refuse more heads than the stored rows serve (``dump --keep-rows needed --max-heads K``)."""
        k = self.meta.max_heads
        if k and num_heads > k:
            raise UserError(f"{flag} {num_heads}: {self.path} stores hidden rows for at most {k} heads "
                            f"(dumped with --keep-rows needed --max-heads {k}); use at most {k} heads, or re-dump with "
                            f"--max-heads {num_heads} (or --keep-rows all)")

    def done_units(self) -> np.ndarray:
        return self.stored("unit_done").astype(bool)

    def require_complete(self, allow_partial: bool = False, partial_flag: str | None = "--allow-partial") -> None:
        """Refuse an incomplete store (unless ``allow_partial``) and any store with a chunk missing."""
        if not self.complete and not allow_partial:
            done = int(self.done_units().sum())
            hint = f", or pass {partial_flag}" if partial_flag else ""
            raise UserError(
                f"{self.path}: cache is incomplete ({done}/{self.n_units} units dumped); finish it with "
                f"`medusa-cache dump ... --resume`{hint}"
            )
        missing = self.missing_chunks()
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise UserError(f"{self.path}: {'; '.join(missing[:3])}{more}; the store is damaged: "
                            "run `medusa-cache verify` and re-dump the named units")
        for name in SMALL_ARRAYS:  # every chunk of the small arrays read once: a checksum failure is named here
            if name in self.group:
                self.array(name)
        for name in ("hidden", "hidden_scale"):  # every shard's index checksum, before any output is written
            r = self._reader(name) if name in self.group else None
            for k in (np.flatnonzero(self.done_units()) if r is not None else []):
                r._shard(int(k))

    # ---- chunk presence ---------------------------------------------------------------------------
    def _listing(self) -> set[str]:
        """Every key in the store, through the store's own listing (works for local paths and fsspec URLs)."""
        from zarr.core.sync import sync

        async def collect() -> set[str]:
            return {k async for k in self.group.store.list_prefix("")}

        return sync(collect())

    def expected_chunks(self, name: str) -> list[tuple[str, str]]:
        """(key, description) of every chunk (outer shard when sharded) of array ``name`` that must exist."""
        a = self.group[name]
        grid = a.metadata.chunk_grid.chunk_shape
        shape = tuple(-(-int(s) // int(c)) for s, c in zip(a.shape, grid, strict=True))
        done = self.done_units() if name in PER_UNIT and not self.complete else None
        out = []
        for coords in np.ndindex(*shape) if all(shape) else []:
            if done is not None and not done[coords[0]]:
                continue
            key = f"{name}/{a.metadata.encode_chunk_key(coords)}"
            if name in ("hidden", "hidden_scale", "bad_rows"):
                lo, hi = self.unit_tokens(coords[0])
                out.append((key, f"{name}: shard {key} (unit {coords[0]}, token rows {lo}:{hi}) is missing"))
            else:
                out.append((key, f"{name}: chunk {key} is missing"))
        return out

    def missing_chunks(self) -> list[str]:
        """One message per chunk that must exist and is not in the store (empty when whole).

        Format 1 stores skipped chunks equal to their fill value 0 (e.g. an all-zero ``bad_rows`` shard), so
        for them only ``hidden`` and ``unit_done`` are checked.
        """
        keys = self._listing()
        names = ARRAYS if self.meta.medusa_cache >= 2 else ("hidden", "unit_done")
        if self.codec != "int8":
            names = tuple(n for n in names if n != "hidden_scale")
        if self.meta.keep_rows != "needed":
            names = tuple(n for n in names if n != "row_kept")
        problems = []
        for name in names:
            if name not in self.group:
                problems.append(f"array {name} is missing")
                continue
            problems += [msg for key, msg in self.expected_chunks(name) if key not in keys]
        return problems

    def usable_seqs(self, allow_partial: bool = False, warn: bool = True) -> np.ndarray:
        """The sequences any reader may use: not holding NaN/Inf rows, and (partial stores) fully dumped.

        Training, validation, ``eval`` and ``ablate`` all read through this one function.
        """
        seqs = np.arange(self.n_seqs)
        bad = self.bad_seqs()
        if len(bad):
            if warn:
                print(f"warning: {len(bad)} sequences with NaN/Inf hidden states are excluded ({self.path})",
                      file=sys.stderr)
            seqs = np.setdiff1d(seqs, bad)
        if not self.complete and allow_partial:
            done = self.done_units()
            so = self.stored_offsets()
            a_unit = np.minimum(so[:-1] // self.shard_tokens, self.n_units - 1)
            b_unit = (np.maximum(so[1:], 1) - 1) // self.shard_tokens
            seqs = seqs[done[a_unit[seqs]] & done[b_unit[seqs]]]
        return seqs

    # ---- hidden states --------------------------------------------------------------------------
    def read_hidden(self, start: int, stop: int, packed: bool = False) -> torch.Tensor:
        """Token rows [start, stop) of the hidden states: the stored dtype, float32 for int8 (``packed``: int8 rows
        of ``int8_pack``, decoded later by ``int8_unpack``, e.g. on the training device).

        With keep_rows "needed", a row that is not stored reads as 0: no reader with at most ``max_heads`` heads uses
        it (its targets are all ignored; ``require_reach`` refuses more heads)."""
        if self.row_start is None:
            return self.read_rows(start, stop, packed)
        rows = self.read_rows(int(self.row_start[start]), int(self.row_start[stop]), packed)
        out = torch.zeros((stop - start, rows.shape[1]), dtype=rows.dtype)
        out[torch.from_numpy(self.row_kept[start:stop])] = rows
        return out

    def read_rows(self, start: int, stop: int, packed: bool = False, direct: bool = True) -> torch.Tensor:
        """Stored rows [start, stop) of `hidden` (= token rows unless keep_rows is "needed").

        Local stores are read by ``ShardReader`` (shard files directly, several times faster than zarr's own read
        path: README, tools/bench_storage.py part 4); ``direct=False`` (verify --deep) and URLs use zarr."""
        try:
            arr = self._read("hidden", start, stop, direct)
        except ChunkError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt or missing chunk: name the shard
            for k in range(start // self.shard_tokens, (stop - 1) // self.shard_tokens + 1):
                a, b = self.unit_range(k)
                try:
                    self.hidden[max(a, start) : min(b, stop)]
                except Exception:  # noqa: BLE001
                    raise UserError(f"{self.path}: shard hidden/c/{k}/0 (token rows {a}:{b}) cannot be read "
                                    f"({e}); run `medusa-cache verify --deep`") from None
            raise UserError(f"{self.path}/hidden: cannot read token rows {start}:{stop} ({e})") from None
        if self.codec == "int8":  # dequantised to float32, vectorised (or packed, to be decoded where it is used)
            scale = torch.from_numpy(np.ascontiguousarray(self._read("hidden_scale", start, stop, direct)))
            q = torch.from_numpy(np.ascontiguousarray(arr))
            return int8_pack(q, scale) if packed else int8_decode(q, scale, self.int8_group)
        return from_stored(np.ascontiguousarray(arr), self.hidden_dtype)

    def _reader(self, name: str) -> ShardReader | None:
        if not self.direct_reads or is_url(self.path):
            return None
        if name not in self._readers:
            self._readers[name] = ShardReader.open(self.group[name], Path(self.path) / name)
        return self._readers[name]

    def _read(self, name: str, start: int, stop: int, direct: bool) -> np.ndarray:
        r = self._reader(name) if direct else None
        if r is not None:
            return r.read(start, stop)
        try:
            return self.group[name][start:stop]
        except Exception as e:  # noqa: BLE001 - zarr's own checks (chunk CRC32C, shard index, decoding)
            units = f"unit {start // self.shard_tokens}" if (stop - 1) // self.shard_tokens == start // \
                self.shard_tokens else f"units {start // self.shard_tokens}..{(stop - 1) // self.shard_tokens}"
            raise ChunkError(f"{self.path}/{name}: rows {start}:{stop} ({units}, shards {name}/c/K/0) cannot be read "
                             f"({type(e).__name__}: {e}): a chunk changed on disk or is damaged; `medusa-cache verify "
                             "--deep` names it; re-dump the store (or restore the file)") from None

    def reads_into(self) -> bool:
        """Whether ``read_hidden_into`` can fill a caller's buffer without intermediate copies (local, all rows)."""
        return self.row_start is None and self._reader("hidden") is not None and (
            self.codec != "int8" or self._reader("hidden_scale") is not None)

    def hidden_width(self, packed: bool) -> tuple[int, torch.dtype]:
        """(columns, dtype) of what ``read_hidden(..., packed)`` returns."""
        if self.codec == "int8":
            return (self.hidden_size + 4 * (self.hidden_size // self.int8_group), torch.int8) if packed else \
                (self.hidden_size, torch.float32)
        return self.hidden_size, TORCH_DTYPES[self.hidden_dtype]

    def read_hidden_into(self, start: int, stop: int, out: torch.Tensor, packed: bool = False) -> None:
        """``out[:] = read_hidden(start, stop, packed)`` with the chunks decoded straight into ``out`` (``reads_into``).

        The loader fills each batch's buffer this way: no per-block read, per-sequence copy or concatenation."""
        if self.codec == "int8" and packed:
            h = self.hidden_size
            self._readers["hidden"].read(start, stop, out[:, :h].numpy())
            self._readers["hidden_scale"].read(start, stop, out[:, h:].view(torch.float32).numpy())
        elif self.codec == "int8":
            out.copy_(self.read_rows(start, stop))
        elif self.hidden_dtype == "bfloat16":
            self._readers["hidden"].read(start, stop, out.view(torch.int16).numpy().view(np.uint16))
        else:
            self._readers["hidden"].read(start, stop, out.numpy())

    def write_unit(self, k: int, hidden: torch.Tensor) -> int:
        """Write unit k's rows (and its shard of ``bad_rows``: rows holding NaN/Inf). Returns #bad rows."""
        a, b = self.unit_range(k)
        if tuple(hidden.shape) != (b - a, self.hidden_size):
            raise ValueError(f"write_unit({k}): expected rows of shape {(b - a, self.hidden_size)}, got "
                             f"{tuple(hidden.shape)}")
        self._readers = {}  # its shard files are about to change
        bad = (~torch.isfinite(hidden).all(dim=1)).numpy().astype(np.uint8)
        with zarr.config.set(_WRITE_ALL):
            if self.codec == "int8":
                q, scale = int8_encode(hidden, self.int8_group)
                self.hidden[a:b] = q.numpy()
                self.group["hidden_scale"][a:b] = scale.numpy()
            else:
                self.hidden[a:b] = to_stored(hidden, self.hidden_dtype)
            if "bad_rows" in self.group:
                self.group["bad_rows"][a:b] = bad
        self._fsync_local(f"hidden/c/{k}/0")
        return int(bad.sum())

    def bad_seqs(self) -> np.ndarray:
        """Sequences with a NaN/Inf hidden row (recorded by the dump; excluded from training)."""
        if "bad_rows" not in self.group:
            return np.zeros(0, dtype=np.int64)
        flags = self.stored("bad_rows")
        if not self.complete:  # rows of units not dumped yet read as the fill value
            flags = np.where(np.repeat(self.done_units(), self.shard_tokens)[: self.n_rows], flags, 0)
        rows = self.token_of_row(np.flatnonzero(flags))
        return np.unique(np.searchsorted(self.offsets, rows, side="right") - 1)

    def mark_done(self, k: int) -> None:
        self.group["unit_done"][k] = 1
        self._fsync_local(f"unit_done/c/{k}")

    def set_attrs(self, **kw: Any) -> None:
        self.group.attrs.update(kw)
        self.attrs.update(kw)
        self.meta = StoreMeta.from_attrs(self.attrs, self.path)

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


SMALL_ARRAYS = ("input_ids", "loss_mask", "labels", "seq_offsets", "seq_source", "d2t", "t2d", "token_counts",
                "row_kept", "bad_rows", "unit_done")  # every array but the hidden states


class ChunkError(UserError):
    """A chunk whose bytes on disk are not what the dump wrote (checksum mismatch, truncated shard, undecodable):
    named by store, array, chunk, shard (= unit) and rows, so it is never read as data."""


class ShardReader:
    """Rows of a 2-D token-axis array read straight from its shard files (the layout `create` writes).

    zarr 3.1's read path costs more than decoding on two cores (its async machinery per chunk): reading a shard's
    index (little-endian uint64 offset/length pairs at the end of the file, zarr's sharding format) and decoding
    each needed chunk with Blosc directly (uncompressed chunks: a memory map) returns the same bytes, several times
    faster (README). Any other layout (another codec chain, index at the start) is read through zarr."""

    EMPTY = (1 << 64) - 1

    def __init__(self, directory: Path, shard: int, chunk: int, width: int, dtype: np.dtype, compressed: bool, fill,
                 checksummed: bool = False):
        self.dir, self.shard, self.chunk, self.width, self.dtype = directory, shard, chunk, width, dtype
        self.compressed, self.fill, self.per_shard = compressed, fill, shard // chunk
        self.checksummed = checksummed  # format 5: each chunk ends with the CRC32C of the bytes before it
        self.verify = True  # check those checksums (tools/bench_checksum.py turns it off to measure their cost)
        self.index: dict[int, tuple[np.memmap, np.ndarray]] = {}

    @staticmethod
    def open(array, directory: Path) -> ShardReader | None:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        codecs = array.metadata.codecs
        if array.ndim != 2 or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sc = codecs[0]
        inner, index = list(sc.codecs), list(sc.index_codecs)
        checksummed = bool(inner) and isinstance(inner[-1], Crc32cCodec)
        if checksummed:
            inner = inner[:-1]
        little = [c for c in inner + index if isinstance(c, BytesCodec)]
        if (str(sc.index_location.value) != "end" or not isinstance(inner[0], BytesCodec)
                or any(not isinstance(c, BloscCodec) for c in inner[1:]) or len(inner) > 2
                or [type(c) for c in index] != [BytesCodec, Crc32cCodec]
                or any(c.endian is not None and c.endian.value != "little" for c in little)):
            return None
        shard, width = array.metadata.chunk_grid.chunk_shape
        chunk, cw = sc.chunk_shape
        if cw != width or array.shape[1] != width or shard % chunk:
            return None
        return ShardReader(directory, int(shard), int(chunk), int(width), np.dtype(array.dtype), len(inner) == 2,
                           array.metadata.fill_value, checksummed)

    def _bad(self, k: int, what: str, chunk: int | None = None) -> ChunkError:
        rows = (f"chunk {chunk}, rows {chunk * self.chunk}:{(chunk + 1) * self.chunk}" if chunk is not None else
                f"rows {k * self.shard}:{(k + 1) * self.shard}")
        return ChunkError(f"{self.dir}: shard c/{k}/0 (unit {k}, {rows}) {what}: the file changed after the dump wrote "
                          "it (a bad disk or copy); `medusa-cache verify --deep` lists every damaged chunk; re-dump "
                          "the store (or restore the file)")

    def _shard(self, k: int) -> tuple[np.memmap | None, np.ndarray | None]:
        """(file, index [chunks, 2]) of shard k, checksum-checked as zarr does; (None, None) when it is absent
        (it reads as the fill value, as through zarr; `require_complete` and `verify` name it)."""
        if k not in self.index:
            import google_crc32c

            f = self.dir / "c" / str(k) / "0"
            if not f.exists():
                return None, None
            mm = np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size else np.zeros(0, np.uint8)
            m = self.per_shard * 16
            raw = mm[len(mm) - m - 4 : len(mm) - 4] if len(mm) >= m + 4 else None
            if raw is None or google_crc32c.value(bytes(raw)) != int(np.frombuffer(mm[-4:], "<u4")[0]):
                raise self._bad(k, "fails its index checksum (truncated or corrupt)")
            idx = np.frombuffer(raw, "<u8").reshape(-1, 2)
            used = idx[idx[:, 0] != self.EMPTY]
            if len(used) and int((used[:, 0] + used[:, 1]).max()) > len(mm) - m - 4:
                raise self._bad(k, "has a chunk beyond the end of the file")
            if len(self.index) >= 16:  # a few shards stay open: batches draw pieces from anywhere in the store
                self.index.pop(next(iter(self.index)))
            self.index[k] = (mm, idx)
        return self.index[k]

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) (into ``out`` when given, which may be a strided view); compressed chunks are decoded on
        up to ``READ_THREADS`` threads (Blosc releases the GIL), each into its own rows of the output."""
        from numcodecs import blosc

        if out is None:
            out = np.empty((stop - start, self.width), self.dtype)
        jobs = []
        for c in range(start // self.chunk, (stop - 1) // self.chunk + 1 if stop > start else 0):
            mm, idx = self._shard(c * self.chunk // self.shard)
            r0 = c * self.chunk
            a, b = max(r0, start), min(r0 + self.chunk, stop)
            off, nb = (int(x) for x in idx[c % self.per_shard]) if idx is not None else (self.EMPTY, 0)
            if off == self.EMPTY:
                out[a - start : b - start] = self.fill
            else:
                jobs.append((mm[off : off + nb], c, a, b))

        def decode(job) -> None:
            raw, c, a, b = job
            r0 = c * self.chunk
            if self.checksummed:
                import google_crc32c

                if self.verify and (len(raw) < 4 or
                                    google_crc32c.value(raw[:-4]) != int(np.frombuffer(raw[-4:], "<u4")[0])):
                    raise self._bad(c * self.chunk // self.shard, "fails its checksum", c)
                raw = raw[:-4]
            try:
                data = np.frombuffer(blosc.decompress(raw) if self.compressed else raw, self.dtype)
                data = data.reshape(-1, self.width)
            except (RuntimeError, ValueError):
                raise self._bad(c * self.chunk // self.shard, "cannot be decoded", c) from None
            out[a - start : b - start] = data[a - r0 : b - r0]

        if (self.compressed or (self.checksummed and self.verify)) and len(jobs) > 1 and READ_THREADS > 1:
            list(_read_pool().map(decode, jobs))
        else:
            for job in jobs:
                decode(job)
        return out


READ_THREADS = min(8, os.cpu_count() or 1)  # chunk-decoding threads of ShardReader (tools/bench_storage.py)
_POOL = None


def _read_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="medusa-cache-read")
    return _POOL


def int8_encode(hidden: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per ``group`` channels of each row: q = round(x / s), s = absmax / 127.

    Per-group scales (not per-row) keep the few outlier channels of real post-norm states from flattening every
    other channel of the row to a handful of levels. A NaN/Inf row gives a NaN scale (the row is in bad_rows)."""
    x = hidden.float().reshape(hidden.shape[0], -1, group)
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, (x / scale.clamp_min(torch.finfo(torch.float32).tiny)).round(), torch.zeros_like(x))
    bad = ~torch.isfinite(scale)
    q = torch.where(bad, torch.zeros_like(q), q).clamp(-127, 127).to(torch.int8)
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return q.reshape(hidden.shape), scale.squeeze(-1)


def int8_decode(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    n, h = q.shape
    return (q.reshape(n, -1, group).float() * scale.unsqueeze(-1)).reshape(n, h)


def int8_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One int8 tensor [T, H + 4 * H/g] per row: the codes, then the row's float32 scales as bytes.

    Rows stay rows, so a loader slices, concatenates and indexes packed rows exactly as decoded ones, moves
    about a quarter of float32's bytes to the device and decodes there (``int8_unpack``)."""
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=1)


def int8_unpack(packed: torch.Tensor, hidden_size: int, group: int) -> torch.Tensor:
    """float32 [T, H] from ``int8_pack``'s rows, on whatever device they are."""
    q, s = packed[:, :hidden_size], packed[:, hidden_size:].contiguous().view(torch.float32)
    return int8_decode(q, s, group)


def to_stored(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return hidden.to(torch.float32).contiguous().numpy()


def from_stored(arr: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)
