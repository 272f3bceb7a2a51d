"""Writing a store: create it (every array of ``spec.ARRAYS``), write and mark units, hold the writer lock.

Hidden states are written one *unit* at a time, a unit being exactly one shard of ``hidden`` (stored rows
``[k*shard_tokens, (k+1)*shard_tokens)``), so each writer owns whole shards and two writers can never rewrite each
other's shard. Everything else (ids, mask, labels, offsets, vocab mapping) is known after tokenisation and written
once, before any unit, by one process. Unit ``k`` is marked done in ``unit_done[k]`` (one chunk per unit, so ranks
never share a chunk) only after its shard is written; the ``complete`` attribute is set last.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from ..errors import UserError
from ..vocab import IGNORE, VocabMapping
from .codec import default_int8_group, int8_encode, to_stored
from .paths import empty_dir, is_url
from .reader import Cache
from .spec import FORMAT_VERSION, SPECS, Layout, StoreMeta, chain, chunk_key, hidden_layout, shard_key

_WRITE_ALL = {"array.write_empty_chunks": True}  # every chunk is written: one missing from the listing is a loss
SCALE = {"hidden": "hidden_scale", "aux_hidden": "aux_scale"}  # int8: each state array's scales


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


class CacheWriter(Cache):
    """A store opened by its one writer (the dump): units written, marked done, attributes set, made durable."""

    def __init__(self, path: str | Path):
        super().__init__(path, mode="r+")

    def write_unit(self, k: int, hidden: torch.Tensor, aux: torch.Tensor | None = None) -> int:
        """Write unit k's rows (and its shard of ``bad_rows``: rows holding NaN/Inf; and of ``aux_hidden`` when the
        store has auxiliary layers: ``aux`` [rows, A*H], the layers side by side). Returns #bad rows."""
        a, b = self.unit_range(k)
        if tuple(hidden.shape) != (b - a, self.hidden_size):
            raise ValueError(f"write_unit({k}): expected rows of shape {(b - a, self.hidden_size)}, got "
                             f"{tuple(hidden.shape)}")
        width = len(self.meta.aux_layers) * self.hidden_size
        if (aux is None) != (width == 0) or (aux is not None and tuple(aux.shape) != (b - a, width)):
            raise ValueError(f"write_unit({k}): the store's aux_layers {self.meta.aux_layers} need aux rows of shape "
                             f"{(b - a, width)}, got {None if aux is None else tuple(aux.shape)}")
        self.reads.forget()  # its shard files are about to change
        bad = (~torch.isfinite(hidden).all(dim=1)).numpy().astype(np.uint8)
        with zarr.config.set(_WRITE_ALL):
            for name, rows in (("hidden", hidden), ("aux_hidden", aux)) if width else (("hidden", hidden),):
                if self.codec == "int8":
                    q, scale = int8_encode(rows, self.int8_group)
                    self.group[name][a:b] = q.numpy()
                    self.group[SCALE[name]][a:b] = scale.numpy()
                else:
                    self.group[name][a:b] = to_stored(rows, self.hidden_dtype)
            if "bad_rows" in self.group:
                self.group["bad_rows"][a:b] = bad
        self._fsync_local(shard_key("hidden", k))
        if width:
            self._fsync_local(shard_key("aux_hidden", k))
        return int(bad.sum())

    def mark_done(self, k: int) -> None:
        self.group["unit_done"][k] = 1
        self._fsync_local(chunk_key("unit_done", k))

    def set_attrs(self, **kw: Any) -> None:
        self.meta = dataclasses.replace(self.meta, **kw)  # a name StoreMeta does not know is a TypeError here
        self.group.attrs.update(kw)

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


@dataclasses.dataclass
class Contents:
    """What a dump knows before any unit: the arrays written once (``spec.ARRAYS`` that are not per unit)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    sources: np.ndarray
    mapping: VocabMapping
    token_counts: np.ndarray
    row_kept: np.ndarray | None = None
    """bool [N] (``rows.needed_rows``): ``hidden`` holds only these rows, in token order (format 4)."""

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids.astype(np.int32), "loss_mask": self.loss_mask.astype(np.uint8),
               "labels": self.labels.astype(np.int32), "seq_offsets": self.offsets.astype(np.int64),
               "seq_source": self.sources.astype(np.int64), "d2t": self.mapping.d2t.astype(np.int64),
               "t2d": self.mapping.t2d.astype(bool), "token_counts": self.token_counts.astype(np.int64)}
        if self.row_kept is not None:
            out["row_kept"] = np.asarray(self.row_kept).astype(np.uint8)
        return out


@dataclasses.dataclass
class HiddenFormat:
    """How the hidden states are stored: lossless ``dtype`` or int8 (one float32 scale per ``int8_group``
    channels of each row, ``hidden_scale``), Blosc ``compression`` (zstd, lz4 or none)."""

    size: int
    dtype: str
    codec: str = "lossless"
    int8_group: int | None = None
    """int8: channels per scale (default: ``codec.default_int8_group``, as ``dump``)."""
    compression: str = "zstd"
    max_heads: int = 0
    """keep_rows needed: the most heads the kept rows serve."""
    aux_layers: tuple[int, ...] = ()
    """Decoder layers whose outputs ``aux_hidden`` stores beside ``hidden`` (format 6), in the same codec."""

    def __post_init__(self) -> None:
        if self.int8_group is None:
            self.int8_group = default_int8_group(self.size)


def create(path: str | Path, hidden: HiddenFormat, layout: Layout, contents: Contents,
           attrs: dict[str, Any]) -> CacheWriter:
    """Preallocate a store: every array of ``spec.ARRAYS`` that this store has, the once-written ones filled."""
    n = int(contents.offsets[-1])
    kept = contents.row_kept
    if kept is not None and (len(kept) != n or not np.count_nonzero(kept)):
        raise ValueError("store.create: row_kept must be [N] and keep at least one row")
    if hidden.aux_layers and kept is not None:
        raise UserError("--aux-layers: Eagle3's features need every row; it cannot be combined with --keep-rows needed")
    if hidden.codec == "int8" and hidden.size % hidden.int8_group:
        raise UserError(f"--int8-group: {hidden.int8_group} does not divide the hidden size {hidden.size}")
    m = n if kept is None else int(np.count_nonzero(kept))  # rows of `hidden`
    n_units = max(1, -(-m // layout.shard_tokens))
    try:
        meta = StoreMeta(
            medusa_cache=FORMAT_VERSION, hidden_size=hidden.size, hidden_dtype=hidden.dtype,
            chunk_tokens=layout.chunk_tokens, shard_tokens=layout.shard_tokens, n_units=n_units,
            hidden_codec=hidden.codec, int8_group=hidden.int8_group if hidden.codec == "int8" else 0,
            keep_rows="all" if kept is None else "needed", max_heads=0 if kept is None else int(hidden.max_heads),
            aux_layers=[int(x) for x in hidden.aux_layers], **attrs)
    except TypeError as e:
        raise ValueError(f"store.create: attributes not in StoreMeta ({e})") from None
    with zarr.config.set(_WRITE_ALL):
        # an existing (empty, locked) directory is kept: mode "w" would delete and recreate it under the lock
        mode = "a" if not is_url(path) and Path(path).is_dir() else "w"
        if mode == "a":  # what mode "w" would do, in place: a store left half-prepared by a kill is started over
            empty_dir(Path(path))
        group = zarr.open_group(str(path), mode=mode, attributes={"medusa_cache_preparing": True})
        for name, data in contents.arrays().items():
            _array(group, name, data.shape, data.dtype, layout)[...] = data
        for name, rows in (("bad_rows", m), ("unit_done", n_units)):
            _array(group, name, (rows,), np.dtype(SPECS[name].dtype), layout)
        dtype, fill = hidden_layout(hidden.dtype, hidden.codec)
        compression = None if hidden.compression == "none" else hidden.compression
        widths = {"hidden": hidden.size, "aux_hidden": len(hidden.aux_layers) * hidden.size}
        for name, width in widths.items() if hidden.aux_layers else [("hidden", hidden.size)]:
            if hidden.codec == "int8":
                _array(group, SCALE[name], (m, width // hidden.int8_group), np.dtype(np.float32), layout)
            group.create_array(name, shape=(m, width), dtype=dtype, chunks=(layout.chunk_tokens, width),
                               shards=(layout.shard_tokens, width), fill_value=fill,
                               compressors=chain(np.dtype(dtype).itemsize, compression),
                               attributes={"logical_dtype": hidden.dtype, "codec": hidden.codec})
    group.attrs.update(meta.to_dict())  # medusa_cache_preparing False: from here on a (resumable) store
    return CacheWriter(path)


def _array(group: zarr.Group, name: str, shape: tuple, dtype: np.dtype, layout: Layout) -> zarr.Array:
    """Create array ``name`` as ``spec.SPECS`` declares it (fill value, chunking along its axis)."""
    spec = SPECS[name]
    if spec.axis == "tokens":
        grid = dict(chunks=(layout.chunk_tokens, *shape[1:]), shards=(layout.shard_tokens, *shape[1:]))
    elif name == "unit_done":  # one chunk per unit: ranks never share a chunk
        grid = dict(chunks=(1,))
    else:
        grid = dict(chunks=(max(1, shape[0]), *shape[1:]))
    return group.create_array(name, shape=shape, dtype=dtype, fill_value=spec.fill,
                              compressors=chain(dtype.itemsize, None if name == "unit_done" else "zstd"), **grid)


def from_arrays(path: str | Path, hidden: torch.Tensor, offsets, labels, mapping: VocabMapping, *,
                input_ids=None, loss_mask=None, row_kept: np.ndarray | None = None, layout: Layout | None = None,
                complete: bool = True, attrs: dict[str, Any] | None = None, aux: torch.Tensor | None = None,
                **fmt: Any) -> CacheWriter:
    """A whole store from arrays already in memory: the one builder tests and tools use for synthetic caches.

    ``labels`` are draft ids or IGNORE; ``input_ids`` default to the labels' target ids (0 where ignored) and
    ``loss_mask`` to ``labels != IGNORE``. ``fmt``: ``HiddenFormat``'s fields (``hidden_dtype``, ``hidden_codec``,
    ``int8_group``, ``hidden_compression``, ``max_heads``). Every unit is written and marked done; ``complete`` sets
    the flag. ``hidden`` has a row per token; with ``row_kept`` only those rows are stored. ``aux``: [N, A*H]
    auxiliary states (format 6), of layers ``aux_layers`` (a ``fmt`` key; default 0..A-1)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int32)
    if input_ids is None:
        input_ids = np.where(labels == IGNORE, 0, mapping.draft_to_target[np.maximum(labels, 0)])
    if loss_mask is None:
        loss_mask = labels != IGNORE
    names = {"hidden_dtype": "dtype", "hidden_codec": "codec", "int8_group": "int8_group",
             "hidden_compression": "compression", "max_heads": "max_heads", "aux_layers": "aux_layers"}
    fmt = {names[k]: v for k, v in fmt.items()}
    if aux is not None:
        fmt.setdefault("aux_layers", tuple(range(aux.shape[1] // hidden.shape[1])))
    contents = Contents(np.asarray(input_ids), np.asarray(loss_mask), labels, offsets,
                        np.zeros((len(offsets) - 1, 2)), mapping, np.zeros(mapping.target_size), row_kept)
    c = create(path, HiddenFormat(hidden.shape[1], **{"dtype": "float32", **fmt}), layout or Layout(64, 256), contents,
               {"vocab_size": mapping.target_size, "draft_vocab_size": mapping.draft_size,
                "fingerprints": {"model": "synthetic"}, **(attrs or {})})
    if row_kept is not None:
        hidden = hidden[torch.from_numpy(np.asarray(row_kept, dtype=bool))]
    for k in range(c.n_units):
        a, b = c.unit_range(k)
        c.write_unit(k, hidden[a:b], None if aux is None else aux[a:b])
        c.mark_done(k)
    if complete:
        c.set_attrs(complete=True)
    return c
