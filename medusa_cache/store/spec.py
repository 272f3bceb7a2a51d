"""The cache format, declared once (docs/cache-format.md is its prose; a test keeps the two equal).

Everything that knows what a store holds reads it from here: the format version, the typed group attributes
(``StoreMeta``, used both to write and to read), the table of arrays (``ARRAYS``: name, shape, dtype, fill value,
whether written per unit, since which version, present when), the codec chains, the shard key, and the one
function that gives an older store the attributes a newer one would have (``upgrade``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UserError

FORMAT_VERSION = 6
"""1: the layout; 2: fill values that cannot pass as data (every chunk written); 3: optional int8 hidden codec
(``hidden_scale``); 4: optional needed-rows layout (``keep_rows = "needed"``: ``hidden`` holds only the rows
``row_kept`` marks); 5: every chunk of every array ends with a CRC32C of its bytes (zarr's crc32c codec, last in the
chain), which every read checks: a byte changed on disk is a named error, never data; 6: optional auxiliary layers
(``aux_layers``: ``aux_hidden`` holds the outputs of those decoder layers, before any norm, for Eagle3's
features)."""

HIDDEN_DTYPES = {"bfloat16": np.uint16, "float32": np.float32}  # stored dtype of lossless states (no bf16 in zarr)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
HIDDEN_FILL = {"bfloat16": 0x7FC0, "float32": float("nan")}  # 0x7FC0: the bf16 quiet-NaN bit pattern
INT8_FILL = -128  # symmetric quantisation writes -127..127 only, so a lost int8 chunk cannot pass as data


@dataclass(frozen=True)
class ArraySpec:
    """One array of the format. Fill values cannot pass as data (format 2): zarr returns the fill value for a chunk
    that is not in the store, so a lost chunk reads as NaN / -1 / 255, never as plausible zeros."""

    name: str
    shape: str
    """As docs/cache-format.md writes it: N tokens, M stored rows, S sequences, V target and D draft vocabulary, A
    auxiliary layers."""
    dtype: str
    """numpy dtype; ``hidden``'s depends on the codec and dtype (``hidden_layout``)."""
    fill: Any
    per_unit: bool = False
    """Written unit by unit, sharded like ``hidden`` (only done units' chunks exist before the store is complete);
    otherwise written once, before any unit."""
    axis: str = "whole"
    """tokens: chunked and sharded along the token axis (``chunk_tokens``/``shard_tokens``); whole: one chunk."""
    since: int = 1
    """Required in stores of this format version and later."""
    when: str = "always"
    """always, int8 (``hidden_codec = "int8"``), needed (``keep_rows = "needed"``), aux (``aux_layers`` not empty)
    or int8+aux (both)."""

    def present(self, meta: StoreMeta) -> bool:
        int8, aux = meta.hidden_codec == "int8", bool(meta.aux_layers)
        return (meta.medusa_cache >= self.since and
                {"always": True, "int8": int8, "needed": meta.keep_rows == "needed", "aux": aux,
                 "int8+aux": int8 and aux}[self.when])


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("hidden", "[M, H]", "uint16, float32 or int8", None, per_unit=True, axis="tokens"),
    ArraySpec("input_ids", "[N]", "int32", -1, axis="tokens"),
    ArraySpec("loss_mask", "[N]", "uint8", 255, axis="tokens"),
    ArraySpec("labels", "[N]", "int32", -2, axis="tokens"),
    ArraySpec("seq_offsets", "[S+1]", "int64", -1),
    ArraySpec("seq_source", "[S, 2]", "int64", -1),
    ArraySpec("d2t", "[D]", "int64", -1),
    ArraySpec("t2d", "[V]", "bool", False),
    ArraySpec("token_counts", "[V]", "int64", -1),
    ArraySpec("bad_rows", "[M]", "uint8", 255, per_unit=True, axis="tokens", since=2),  # some format-1 stores lack it
    ArraySpec("unit_done", "[n_units]", "uint8", 0, per_unit=True),
    ArraySpec("hidden_scale", "[M, H / g]", "float32", float("nan"), per_unit=True, axis="tokens", since=3,
              when="int8"),
    ArraySpec("row_kept", "[N]", "uint8", 255, axis="tokens", since=4, when="needed"),
    ArraySpec("aux_hidden", "[M, A * H]", "as hidden", None, per_unit=True, axis="tokens", since=6, when="aux"),
    ArraySpec("aux_scale", "[M, A * H / g]", "float32", float("nan"), per_unit=True, axis="tokens", since=6,
              when="int8+aux"),
)
SPECS = {a.name: a for a in ARRAYS}


def expected_shape(spec: ArraySpec, dims: dict[str, int]) -> tuple[int, ...]:
    """``spec.shape`` evaluated for one store: ``dims`` gives N, M, S, H, V, D, A, g and n_units."""
    return tuple(int(eval(d, {"__builtins__": {}}, dims)) for d in spec.shape.strip("[]").split(","))  # noqa: S307
PER_UNIT = tuple(a.name for a in ARRAYS if a.per_unit)
STATES = ("hidden", "hidden_scale", "aux_hidden", "aux_scale")  # the 2-D sharded arrays, read a unit at a time
SMALL_ARRAYS = tuple(a.name for a in ARRAYS if a.name not in STATES)  # read whole at open


def chunk_key(name: str, *coords) -> str:
    """Key of the chunk (or shard) at grid ``coords`` of array ``name``, relative to the store: zarr v3's default
    chunk key encoding, the only place the layout of keys is written down."""
    return f"{name}/c/" + "/".join(str(c) for c in coords)


def shard_key(name: str, k) -> str:
    """Key of shard k (= unit k) of a sharded 2-D array (``hidden``, ``hidden_scale``)."""
    return chunk_key(name, k, 0)


def hidden_layout(hidden_dtype: str, hidden_codec: str) -> tuple[type, Any]:
    """(stored numpy dtype, fill value) of ``hidden``."""
    if hidden_codec == "int8":
        return np.int8, INT8_FILL
    return HIDDEN_DTYPES[hidden_dtype], HIDDEN_FILL[hidden_dtype]


def chain(typesize: int, cname: str | None = "zstd") -> list:
    """A chunk's bytes-to-bytes codecs (format 5): Blosc (``cname`` None: none), then a CRC32C of the result."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    blosc = BloscCodec(cname=cname, clevel=3 if cname == "zstd" else 1, shuffle="bitshuffle", typesize=typesize) \
        if cname else None
    return ([blosc] if blosc else []) + [Crc32cCodec()]


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

    @staticmethod
    def choose(hidden_size: int, itemsize: int, max_length: int, chunk_tokens: int | None = None,
               shard_tokens: int | None = None) -> Layout:
        """``default``, with --chunk-tokens/--shard-tokens where given (dump and import alike)."""
        layout = Layout.default(hidden_size, itemsize, max_length)
        if chunk_tokens:
            layout.chunk_tokens = chunk_tokens
            if not shard_tokens:
                layout.shard_tokens = max(layout.shard_tokens // chunk_tokens, 1) * chunk_tokens
        if shard_tokens:
            layout.shard_tokens = shard_tokens
            if not chunk_tokens and layout.shard_tokens % layout.chunk_tokens:
                layout.chunk_tokens = layout.shard_tokens
        return layout


# fingerprints added after 0.1.0: a store written before one existed was dumped with its default setting
FINGERPRINT_DEFAULTS = {"hidden_codec": "lossless", "keep_rows": "all", "hidden_compression": "zstd",
                        "aux_layers": "none"}


def upgrade(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes an older store would have if written today: ``StoreMeta``'s field defaults (what an attribute
    added after version 1 means when absent) and the defaults of fingerprints added after 0.1.0, in one place."""
    out = {**{k: v for k, v in _field_defaults().items() if k not in attrs}, **attrs}
    out["fingerprints"] = {**FINGERPRINT_DEFAULTS, **(attrs.get("fingerprints") or {})}
    return out


def _field_defaults() -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(StoreMeta)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@dataclass(frozen=True)
class StoreMeta:
    """The group attributes of a store: every one named, typed and documented here. ``to_dict`` is what ``create``
    writes, ``from_dict`` what every reader validates on open; ``Cache.meta`` is the one copy a process holds
    (``CacheWriter.set_attrs`` replaces it). A field's default is what its absence means in an older store."""

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
    aux_layers: list = field(default_factory=list)
    """Format 6: 0-based decoder layers whose outputs (before any norm) ``aux_hidden`` holds, in its column order
    (SpecForge's ``aux_hidden_state`` layer ids; the last layer's output is the final norm's input); empty: none."""
    model_layers: int = 0
    """Decoder layers of the model (format 6; 0: not recorded): which of ``aux_layers`` is the last one."""
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(attrs: dict[str, Any], where: str) -> StoreMeta:
        hints = typing.get_type_hints(StoreMeta)
        known = {f.name for f in dataclasses.fields(StoreMeta)}
        values = {k: v for k, v in upgrade(attrs).items() if k in known}
        for k, v in values.items():
            want = hints[k]
            want = typing.get_origin(want) or want
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise UserError(f"{where}: attribute {k!r} should be {want.__name__}, found {v!r}")
        try:
            return StoreMeta(**values)
        except TypeError as e:
            raise UserError(f"{where}: store attributes incomplete ({e})") from None


class ChunkError(UserError):
    """A chunk whose bytes on disk are not what the dump wrote (checksum mismatch, truncated shard, undecodable):
    named by store, array, chunk, shard (= unit) and rows, so it is never read as data."""
