"""Should medusa-cache read hidden states through zarr with the Rust `zarrs` codec pipeline instead of its own
shard parser (`store.ShardReader`)? Same store, same shuffled row slices, interleaved, in one run:
our reader, zarr's own read path, and zarr with `zarrs.ZarrsCodecPipeline` (when `zarrs` is installed; it is not
a dependency). Also checks that each path refuses a chunk with one flipped byte (format 5 checksums).

    python tools/bench_zarrs.py             # H 4096 bf16, 100K tokens, 16K-row reads in 512-row slices
    python tools/bench_zarrs.py --quick     # seconds: a small store (what CI runs)

Prints tokens/s per path and per layout (zstd, uncompressed) and the ratios to our reader.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from medusa_cache.store import Cache, Layout, from_arrays, shard_key
from medusa_cache.vocab import VocabMapping


def _zarrs_available() -> bool:
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return False
    return True


PIPELINES = {"zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}


def opener(path: Path, how: str):
    """A function reading rows [a, b) of ``hidden`` by ``how`` (opened once, outside the timing)."""
    if how == "ours":
        c = Cache(path)
        return lambda a, b: c.reads.rows(a, b)
    with zarr.config.set({"codec_pipeline.path": PIPELINES[how]}):
        arr = zarr.open_array(str(path / "hidden"), mode="r")

    def read(a: int, b: int):
        with zarr.config.set({"codec_pipeline.path": PIPELINES[how]}):
            return arr[a:b]

    return read


def read_all(path: Path, slices: list[tuple[int, int]], how: str) -> None:
    read = opener(path, how)
    for a, b in slices:
        read(a, b)


def refuses_flipped_byte(path: Path, how: str) -> bool:
    """Copy the store, flip one byte a quarter into shard 0, read its first 4096 rows by ``how``."""
    with tempfile.TemporaryDirectory() as d:
        bad = Path(d) / "c"
        shutil.copytree(path, bad)
        f = bad / shard_key("hidden", 0)
        data = bytearray(f.read_bytes())
        data[len(data) // 4] ^= 0x01
        f.write_bytes(bytes(data))
        try:
            read_all(bad, [(0, 4096)], how)
        except Exception:  # noqa: BLE001 - any refusal counts
            return True
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    tokens, hidden, reads, repeats = (4096, 256, 2048, 2) if a.quick else (100_000, 4096, 16384, 5)
    paths = ["ours", "zarr"] + (["zarrs"] if _zarrs_available() else [])
    if "zarrs" not in paths:
        print("zarrs is not installed (pip install zarrs): measuring ours vs zarr only")
    print(f"{tokens} tokens, H {hidden}, bf16, {reads} shuffled rows in 512-row slices, median of {repeats}")
    print("| layout | " + " | ".join(f"{h} tok/s" for h in paths) + " | " +
          " | ".join(f"{h}/ours" for h in paths[1:]) + " | refuses a flipped byte |")
    print("|---" * (2 * len(paths) + 1) + "|")
    with tempfile.TemporaryDirectory() as d:
        for comp in ("zstd", "none"):
            path = Path(d) / comp
            m = VocabMapping(np.zeros(8, np.int64), np.ones(8, bool))
            from_arrays(path, torch.randn(tokens, hidden), [0, tokens], np.zeros(tokens, np.int64), m,
                        hidden_dtype="bfloat16", layout=Layout(256, 8192), hidden_compression=comp)
            rng = np.random.default_rng(0)
            starts = rng.choice(np.arange(0, tokens - 512, 512), reads // 512, replace=False)
            slices = [(int(s), int(s) + 512) for s in starts]
            times: dict[str, list[float]] = {h: [] for h in paths}
            readers = {h: opener(path, h) for h in paths}
            for _ in range(repeats):
                for h in paths:
                    t0 = time.perf_counter()
                    for s, e in slices:
                        readers[h](s, e)
                    times[h].append(time.perf_counter() - t0)
            rate = {h: reads / np.median(times[h]) for h in paths}
            refuse = ", ".join(f"{h} {'yes' if refuses_flipped_byte(path, h) else 'NO'}" for h in paths)
            print(f"| {comp} | " + " | ".join(f"{rate[h]:,.0f}" for h in paths) + " | " +
                  " | ".join(f"{rate[h] / rate['ours']:.2f}" for h in paths[1:]) + f" | {refuse} |")


if __name__ == "__main__":
    main()
