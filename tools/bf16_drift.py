"""How far heads trained from a bf16 cache drift from heads trained from a float32 one (= online training).

The float32 cache reproduces online training bit for bit (tests/test_online.py), so the float32 run stands in
for online training here. Same data, same seed, same steps; held-out top-1 per head and chain acceptance, both
scored on the float32 states of the same held-out sequences.

    python tools/bf16_drift.py [--stories medusa-cache-demo/stories.jsonl] [--epochs 4]
    python tools/bf16_drift.py --quick     # seconds: the small demo of tools/quick.py, 1 epoch (what CI runs)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from medusa_cache.acceptance import chain_acceptance  # noqa: E402
from medusa_cache.demo import DEMO, recipe  # noqa: E402
from medusa_cache.dump import DumpConfig, run_dump  # noqa: E402
from medusa_cache.evaluate import head_ranks, topk_accuracy  # noqa: E402
from medusa_cache.headsdir import load_heads  # noqa: E402
from medusa_cache.store import Cache  # noqa: E402
from medusa_cache.train import TrainConfig, split, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stories", default="medusa-cache-demo/stories.jsonl", help="the demo's self-generated stories")
    ap.add_argument("--epochs", type=int, default=recipe()["epochs"])
    ap.add_argument("--quick", action="store_true", help="the small demo of tools/quick.py, 1 epoch (what CI runs)")
    args = ap.parse_args()
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        args.stories, args.epochs = str(quick_demo() / "stories.jsonl"), 1
    model = str(DEMO / "stories260K")
    work = Path(tempfile.mkdtemp())
    res = {}
    for dtype in ("float32", "bfloat16"):
        run_dump(DumpConfig(model=model, data=[args.stories], out=str(work / dtype), dtype=dtype, max_length=512))
        cfg = TrainConfig(cache=str(work / dtype), out=str(work / f"h-{dtype}"), num_heads=5,
                          **{**recipe(), "epochs": args.epochs}, seed=0)
        train(cfg)
        res[dtype] = cfg
    ref = Cache(work / "float32")
    _, val = split(ref, res["float32"])
    print(f"held-out sequences: {len(val)}; scored on float32 states")
    print("| cache | top-1 per head | chain acceptance |\n|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        heads, _, _ = load_heads(work / f"h-{dtype}")
        r = head_ranks(heads, ref, val)
        top1 = topk_accuracy(r["rank"], r["has_target"], (1,))[1]
        print(f"| {dtype} | {' '.join(f'{x:.4f}' for x in top1)} | {chain_acceptance(r['rank']):.4f} |")


if __name__ == "__main__":
    main()
