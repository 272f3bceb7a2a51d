"""What checking every chunk's CRC32C (format 5) costs when reading hidden states: the same store read with the
direct shard reader, checksums checked vs not (same bytes, same order), per layout.

    python tools/bench_checksum.py              # H 4096 bf16, 16K tokens, zstd and uncompressed
    python tools/bench_checksum.py --quick      # seconds: a small store (what CI runs)

Prints tokens/s for both and their ratio, measured in one run, interleaved (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medusa_cache.store import Cache, Layout, from_arrays
from medusa_cache.vocab import VocabMapping


def bench(tokens: int, hidden: int, compression: str, repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        m = VocabMapping(np.zeros(8, np.int64), np.ones(8, bool))
        from_arrays(Path(d) / "c", torch.randn(tokens, hidden), [0, tokens], np.zeros(tokens, np.int64), m,
                    hidden_dtype="bfloat16", layout=Layout(256, 4096), hidden_compression=compression)
        c = Cache(Path(d) / "c")
        r = c.reads.reader("hidden")
        rng = np.random.default_rng(0)
        starts = rng.integers(0, tokens - 512, 64)
        times = {True: [], False: []}
        for _ in range(repeats):
            for check in (True, False):
                r.verify = check
                t0 = time.perf_counter()
                for a in starts:
                    r.read(int(a), int(a) + 512)
                times[check].append(time.perf_counter() - t0)
        n = len(starts) * 512
        return n / np.median(times[True]), n / np.median(times[False])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    tokens, hidden, repeats = (4096, 256, 2) if a.quick else (16384, 4096, 5)
    print(f"{tokens} tokens, H {hidden}, bf16, 64 random reads of 512 rows, median of {repeats}")
    print("| hidden compression | checked tok/s | unchecked tok/s | checked / unchecked |")
    print("|---|---|---|---|")
    for comp in ("zstd", "none"):
        on, off = bench(tokens, hidden, comp, repeats)
        print(f"| {comp} | {on:,.0f} | {off:,.0f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
