"""Benchmark `medusa-cache ablate`; prints the ratio measured in this one run.

Cost of the 1..5-head ablation (one 5-head run with per-head clipping, then evaluation of every head
count with trees of 16/32/64 nodes) / cost of a single 5-head training on the same cache.
Target <= 1.2 (five separate runs of 1..5 heads would cost 15/5 = 3.0 in head-steps).

    python tools/bench_ablate.py [--hidden 256] [--draft 2000] [--tokens 30000]
    python tools/bench_ablate.py --quick     # seconds (what CI runs)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")
from bench_train import synthetic_cache  # noqa: E402

from medusa_cache.ablate import AblateConfig, run_ablate  # noqa: E402
from medusa_cache.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--draft", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--quick", action="store_true", help="a small cache (what CI runs)")
    ap.add_argument("--check", action="store_true", help="exit 1 when the ratio misses its target (not with --quick: "
                    "on a tiny cache fixed costs dominate, and the ratio is a time ratio on a shared machine)")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.draft, a.tokens = 64, 200, 4000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_cache(tmp / "c", a.tokens, a.hidden, a.draft)
        common = dict(cache=str(tmp / "c"), epochs=1, batch_tokens=2048, grad_accum=1, lr=1e-3, val_fraction=0.05,
                      log_every=10**6)
        t0 = time.perf_counter()
        train(TrainConfig(out=str(tmp / "single"), num_heads=5, **common))
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_ablate(TrainConfig(out=str(tmp / "abl"), **common),
                   AblateConfig(heads=[1, 2, 3, 4, 5], layers=[1], lr=[1e-3], tree_budget=[16, 32, 64],
                                verify_cost=0.05))  # synthetic: no model to time
        abl = time.perf_counter() - t0
    print(f"cache: {a.tokens} tokens, hidden {a.hidden}, draft vocab {a.draft}")
    print(f"ablation 1..5 heads {abl:.1f}s / single 5-head training {single:.1f}s = {abl / single:.3f}"
          "   (target <= 1.2; separate runs ~3.0)")
    if a.check and not a.quick and abl / single > 1.2:
        sys.exit(f"target missed: ablation / single training {abl / single:.3f} > 1.2")


if __name__ == "__main__":
    main()
