"""Direct reads of sharded 2-D arrays (``hidden``, ``hidden_scale``) from their shard files, checksums checked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .spec import ChunkError, shard_key


class ShardReader:
    """Rows of a 2-D token-axis array read straight from its shard files (the layout `create` writes).

    zarr 3.1's read path costs more than decoding on two cores (its async machinery per chunk): reading a shard's
    index (little-endian uint64 offset/length pairs at the end of the file, zarr's sharding format) and decoding
    each needed chunk with Blosc directly (uncompressed chunks: a memory map) returns the same bytes, several times
    faster (README). Any other layout (another codec chain, index at the start) is read through zarr."""

    EMPTY = (1 << 64) - 1

    def __init__(self, root: Path, name: str, grid: tuple[int, int, int], dtype: np.dtype, fill,
                 compressed: bool, checksummed: bool = False):
        self.root, self.name, self.dtype, self.fill = root, name, dtype, fill
        self.shard, self.chunk, self.width = grid  # rows per shard, rows per chunk, columns
        self.per_shard = self.shard // self.chunk
        self.compressed = compressed  # Blosc; else the chunk's bytes are the rows
        self.checksummed = checksummed  # format 5: each chunk ends with the CRC32C of the bytes before it
        self.verify = True  # check those checksums (tools/bench_checksum.py turns it off to measure their cost)
        self.index: dict[int, tuple[np.memmap, np.ndarray]] = {}

    @staticmethod
    def open(array, root: Path, name: str) -> ShardReader | None:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

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
        return ShardReader(root, name, (int(shard), int(chunk), int(width)), np.dtype(array.dtype),
                           array.metadata.fill_value, len(inner) == 2, checksummed)

    def _bad(self, k: int, what: str, chunk: int | None = None) -> ChunkError:
        rows = (f"chunk {chunk}, rows {chunk * self.chunk}:{(chunk + 1) * self.chunk}" if chunk is not None else
                f"rows {k * self.shard}:{(k + 1) * self.shard}")
        return ChunkError(f"{self.root}: shard {shard_key(self.name, k)} (unit {k}, {rows}) {what}: "
                          "the file changed after the dump wrote "
                          "it (a bad disk or copy); `medusa-cache verify --deep` lists every damaged chunk; re-dump "
                          "the store (or restore the file)")

    def shard_file(self, k: int) -> tuple[np.memmap | None, np.ndarray | None]:
        """(file, index [chunks, 2]) of shard k, checksum-checked as zarr does; (None, None) when it is absent
        (it reads as the fill value, as through zarr; `require_complete` and `verify` name it)."""
        if k not in self.index:
            import google_crc32c

            f = self.root / shard_key(self.name, k)
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

    def check_shard(self, k: int) -> list[str]:
        """Problems of shard k found from its bytes alone, nothing decoded: a truncated file or index, and every chunk
        whose CRC32C (format 5) disagrees with its bytes."""
        import google_crc32c

        try:
            mm, idx = self.shard_file(k)
        except ChunkError as e:
            return [str(e)]
        if idx is None or not self.checksummed:
            return []
        bad = []
        for j, (off, nb) in enumerate(idx.tolist()):
            if off == self.EMPTY:
                continue
            raw = mm[off : off + nb]
            if len(raw) < 4 or google_crc32c.value(bytes(raw[:-4])) != int(np.frombuffer(raw[-4:], "<u4")[0]):
                bad.append(str(self._bad(k, "fails its checksum", k * self.per_shard + j)))
        return bad

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) (into ``out`` when given, which may be a strided view); compressed chunks are decoded on
        up to ``READ_THREADS`` threads (Blosc releases the GIL), each into its own rows of the output."""
        from numcodecs import blosc

        if out is None:
            out = np.empty((stop - start, self.width), self.dtype)
        jobs = []
        for c in range(start // self.chunk, (stop - 1) // self.chunk + 1 if stop > start else 0):
            mm, idx = self.shard_file(c * self.chunk // self.shard)
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
