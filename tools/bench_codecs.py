"""Compression ratio and decode speed of candidate codecs on real bf16 hidden states (one run).

    python tools/bench_codecs.py CACHE [CACHE ...]
    python tools/bench_codecs.py --quick     # seconds: the small demo cache of tools/quick.py (what CI runs)

Reads up to 4M values of `hidden` from each cache (converted to bf16 when stored as float32), cuts them
into ~1 MiB chunks and reports, per codec, raw/compressed size and decode MB/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from numcodecs import Blosc, Zstd


def main() -> None:
    codecs = {
        "blosc-zstd1-bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
        "blosc-zstd3-bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
        "blosc-zstd1-byteshuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
        "blosc-lz4-bitshuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
        "zstd1": Zstd(1),
    }
    paths = sys.argv[1:]
    if paths == ["--quick"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        paths = [str(quick_demo() / "cache.zarr")]
    if not paths:
        sys.exit("usage: python tools/bench_codecs.py CACHE [CACHE ...] | --quick")
    for path in paths:
        g = zarr.open_group(path, mode="r")
        h = g["hidden"]
        rows = min(h.shape[0], (4 << 20) // h.shape[1])
        x = h[:rows]
        if x.dtype == np.float32:
            x = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        chunk_rows = max(1, (1 << 20) // (2 * h.shape[1]))
        chunks = [np.ascontiguousarray(x[i : i + chunk_rows]) for i in range(0, rows, chunk_rows)]
        raw = sum(c.nbytes for c in chunks)
        print(f"{path}: H={h.shape[1]}, {rows} rows, {len(chunks)} chunks of {chunk_rows} rows (bf16)")
        for name, codec in codecs.items():
            enc = [codec.encode(c) for c in chunks]
            t0 = time.perf_counter()
            for _ in range(3):
                for e in enc:
                    codec.decode(e)
            dt = (time.perf_counter() - t0) / 3
            print(f"  {name:26s} ratio {raw / sum(len(e) for e in enc):.3f}  decode {raw / dt / 1e6:7.0f} MB/s")


if __name__ == "__main__":
    main()
