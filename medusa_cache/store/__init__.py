"""The cache store: the only package that knows the Zarr layout (spec: docs/cache-format.md).

One Zarr v3 group. Sequences are packed end to end along a token axis of length N; nothing is padded. Token-axis
arrays share one shard size, ``shard_tokens``; the hidden states are written one unit (= one shard) at a time.

- ``spec``: the format declared once: version, typed attributes (``StoreMeta``), the array table, codecs, shard key,
  ``upgrade`` for older stores
- ``paths``: local paths and fsspec URLs; is it a store, emptying one
- ``rows``: which rows are stored (needed rows), which sequence owns a row
- ``codec``: bf16 and int8 stored forms of hidden states
- ``shards``: the direct shard reader (checksums checked); ``reads``: the read path of one opened store
- ``reader``: ``Cache``, an opened store; ``audit``: missing and damaged chunks
- ``writer``: ``create``, ``CacheWriter`` (units, done marks), ``WriterLock``, ``from_arrays``
"""

from . import audit
from .audit import require_complete
from .codec import from_stored, int8_decode, int8_encode, int8_pack, int8_unpack, to_stored
from .paths import empty_dir, exists, is_empty, is_store, is_url, remove_store
from .reader import Cache
from .rows import any_in_window, needed_rows, seq_of
from .shards import ShardReader
from .spec import (
                   ARRAYS,
                   FORMAT_VERSION,
                   SMALL_ARRAYS,
                   SPECS,
                   TORCH_DTYPES,
                   ChunkError,
                   Layout,
                   StoreMeta,
                   chunk_key,
                   shard_key,
                   upgrade,
)
from .writer import CacheWriter, Contents, HiddenFormat, WriterLock, create, from_arrays

__all__ = ["ARRAYS", "FORMAT_VERSION", "SMALL_ARRAYS", "SPECS", "TORCH_DTYPES", "Cache", "CacheWriter", "ChunkError",
           "Contents", "HiddenFormat", "Layout", "ShardReader", "StoreMeta", "WriterLock", "any_in_window", "audit",
           "chunk_key",
           "create", "empty_dir", "exists", "from_arrays", "from_stored", "int8_decode", "int8_encode", "int8_pack",
           "int8_unpack", "is_empty", "is_store", "is_url", "needed_rows", "remove_store", "require_complete", "seq_of",
           "shard_key",
           "to_stored", "upgrade"]
