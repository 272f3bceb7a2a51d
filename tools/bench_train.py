"""Benchmark `medusa-cache train` on a synthetic cache; prints ratios measured in this one run.

(a) tokens/s streaming from Zarr / tokens/s with the cache already in RAM (--in-memory)   target >= 0.90
(b) achieved FLOP/s of head training / bare matmul FLOP/s of this machine (float32)        target >= 0.60
(c) peak RSS training over a cache 10x as large / over the 1x cache (streaming)             target <= 1.2
(d) tokens/s of `train --in-memory` / a bare PyTorch loop over the same batches (heads, AdamW,
    cross-entropy with ignore_index, nothing else)                                          target >= 0.80
(e) peak memory of validation / of a training step, at a reference-sized head (H 4096, draft 32000, 4 heads)
                                                                                            target <= 1.0

    python tools/bench_train.py [--hidden 512] [--draft 4000] [--tokens 40000] [--heads 2]
    python tools/bench_train.py --quick     # seconds: hidden 64, draft 200, 6000 tokens (what CI runs)

``--check`` exits 1 when a figure misses its target. CI runs ``--quick --check``, which checks (c) only: a memory
ratio does not depend on how busy the shared machine is; the time ratios (a), (b), (d) are checked without --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from medusa_cache import store  # noqa: E402
from medusa_cache.vocab import VocabMapping  # noqa: E402


def synthetic_cache(path: Path, n_tokens: int, hidden: int, draft: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lens = rng.integers(200, 1200, n_tokens // 300 + 10)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    offsets = offsets[offsets <= n_tokens]
    n = int(offsets[-1])
    g = torch.Generator().manual_seed(seed)
    store.from_arrays(path, torch.randn(n, hidden, generator=g).to(torch.bfloat16), offsets,
                      rng.integers(0, draft, n), VocabMapping(np.zeros(draft, dtype=np.int64), np.ones(draft, bool)),
                      hidden_dtype="bfloat16", layout=store.Layout(256, 16384))


def run_train(cache: Path, out: Path, heads: int, extra: list[str]) -> tuple[float, float]:
    """(train tokens/s from metrics, peak RSS MiB of the child)."""
    code = (
        "import resource,sys; from medusa_cache.cli import main; rc=main(sys.argv[1:]); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    # two epochs, the second one measured (metrics.jsonl gets one record per epoch): warm-up is not timed
    args = ["train", "--cache", str(cache), "--out", str(out), "--num-heads", str(heads), "--epochs", "2",
            "--batch-tokens", "2048", "--grad-accum", "1", "--val-fraction", "0", "--log-every", "1000000",
            "--overwrite", *extra]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode:
        raise SystemExit(p.stderr)
    wall = time.perf_counter() - t0
    rss = int(p.stdout.split("MAXRSS")[-1]) / 1024
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    toks = sum(1 for _ in recs) and recs[-1]["tokens_per_s"]
    return toks, rss if wall else rss


def bare_loop_tps(cache: Path, heads: int, batch_tokens: int = 2048) -> float:
    """The floor: the same heads and optimizer over the same cached rows in 2048-token batches, one epoch."""
    from medusa_cache.heads import MedusaHeads
    from medusa_cache.loader import all_targets

    c = store.Cache(cache)
    h = c.read_hidden(0, c.n_tokens).float()
    tg = torch.from_numpy(all_targets(c.array("labels"), c.offsets, heads))
    model = MedusaHeads(c.hidden_size, c.meta.draft_vocab_size, heads, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):  # two passes, the second one timed, as for train
        t0 = time.perf_counter()
        for a in range(0, c.n_tokens, batch_tokens):
            x, y = h[a : a + batch_tokens], tg[a : a + batch_tokens]
            loss = sum(torch.nn.functional.cross_entropy(lg, y[:, i], ignore_index=-100)
                       for i, lg in enumerate(model(x)))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return c.n_tokens / (time.perf_counter() - t0)


MEMORY_CHILD = """
import resource, sys, torch
from medusa_cache.heads import MedusaHeads
from medusa_cache.objective import head_losses
mode, rows = sys.argv[1], int(sys.argv[2])
hidden, draft, heads = 4096, 32000, 4
torch.manual_seed(0)
model = MedusaHeads(hidden, draft, heads, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.randn(16384, hidden), torch.randint(0, draft, (16384, heads))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "train":  # one optimizer step on a 2048-token batch (AdamW states allocated too)
    losses, _ = head_losses(model, x[:rows], y[:rows])
    sum(losses).backward()
    opt.step()
else:  # validation over 16384 rows, `rows` positions at a time
    with torch.no_grad():
        for a in range(0, 16384, rows):
            losses, _ = head_losses(model, x[a:a + rows], y[a:a + rows])
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss(mode: str, rows: int) -> float:
    p = subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(rows)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr[-2000:])
    return float(p.stdout.split("PEAK")[-1])


def bare_matmul_flops(t: int, h: int, d: int) -> float:
    x, w = torch.randn(t, h), torch.randn(d, h)
    for _ in range(3):
        x @ w.T
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        x @ w.T
        n += 1
    return 2 * t * h * d * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--draft", type=int, default=4000)
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--reference-memory", action="store_true", help="also measure (e): needs ~6 GB and a minute")
    ap.add_argument("--quick", action="store_true", help="a small cache (what CI runs)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a figure misses its target (--quick: (c) only)")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.draft, a.tokens = 64, 200, 6000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_cache(tmp / "c1", a.tokens, a.hidden, a.draft)
        synthetic_cache(tmp / "c10", 10 * a.tokens, a.hidden, a.draft, seed=1)
        stream_tps, rss1 = run_train(tmp / "c1", tmp / "o1", a.heads, [])
        mem_tps, _ = run_train(tmp / "c1", tmp / "o2", a.heads, ["--in-memory"])
        _, rss10 = run_train(tmp / "c10", tmp / "o3", a.heads, ["--max-steps", str(2 * 10 * a.tokens // 2048)])
        bare_tps = bare_loop_tps(tmp / "c1", a.heads)
        flops_per_token = 6 * a.heads * (a.hidden * a.hidden + a.hidden * a.draft)
        mm = bare_matmul_flops(2048, a.hidden, a.draft)
    print(f"cache: {a.tokens} tokens, hidden {a.hidden}, draft vocab {a.draft}, {a.heads} heads, bf16 stored")
    print(f"(a) streaming {stream_tps:.0f} tok/s / in-memory {mem_tps:.0f} tok/s = {stream_tps / mem_tps:.3f}"
          "   (target >= 0.90)")
    print(f"(b) training {stream_tps * flops_per_token / 1e9:.1f} GFLOP/s / bare matmul {mm / 1e9:.1f} GFLOP/s = "
          f"{stream_tps * flops_per_token / mm:.3f}   (target >= 0.60)")
    print(f"(c) peak RSS 10x cache {rss10:.0f} MiB / 1x cache {rss1:.0f} MiB = {rss10 / rss1:.3f}   (target <= 1.2)")
    print(f"(d) train --in-memory {mem_tps:.0f} tok/s / bare loop {bare_tps:.0f} tok/s = {mem_tps / bare_tps:.3f}"
          "   (target >= 0.80)")
    figures = {"(c)": (rss10 / rss1, "<=", 1.2)}
    if not a.quick:
        figures.update({"(a)": (stream_tps / mem_tps, ">=", 0.90),
                        "(b)": (stream_tps * flops_per_token / mm, ">=", 0.60),
                        "(d)": (mem_tps / bare_tps, ">=", 0.80)})
    missed = [f"{k} {v:.3f} not {op} {t}" for k, (v, op, t) in figures.items()
              if not (v <= t if op == "<=" else v >= t)]
    if a.reference_memory:
        step, val, old = peak_rss("train", 2048), peak_rss("val", 2048), peak_rss("val", 16384)
        print(f"(e) peak RSS of validation {val:.0f} MiB / of a training step {step:.0f} MiB = {val / step:.3f}   "
              f"(target <= 1.0; H 4096, draft 32000, 4 heads; validation computing all 16384 rows of a block at "
              f"once, as before --eval-tokens: {old:.0f} MiB = {old / step:.3f})")
        if val / step > 1.0:
            missed.append(f"(e) {val / step:.3f} not <= 1.0")
    if a.check and missed:
        sys.exit("targets missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
