"""The issue-5 table: stories260K self-distilled heads, with and without --init-from-lm-head and --distill.

    python tools/demo_table.py [--work medusa-cache-demo] [--epochs 4]
    python tools/demo_table.py --quick     # seconds: the small demo of tools/quick.py, 2 heads, 1 epoch (CI)

Reuses (or makes) the demo's stories and cache, runs `ablate` (1..5 heads, trees 16/32/64) for the four
combinations, and prints one markdown table: tokens per decoding step (chain, trees) on the model's own answers to the
demo's 8 held-out openings (ablate --heldout-prompts: what speculate measures on them), per-position acceptance of
tree32, and per-head top-1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")

from medusa_cache.ablate import AblateConfig, run_ablate  # noqa: E402
from medusa_cache.demo import DEMO, recipe  # noqa: E402
from medusa_cache.dump import DumpConfig, run_dump  # noqa: E402
from medusa_cache.generate import GenerateConfig, generate  # noqa: E402
from medusa_cache.store import is_store  # noqa: E402
from medusa_cache.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="medusa-cache-demo")
    ap.add_argument("--epochs", type=int, default=recipe()["epochs"])
    ap.add_argument("--quick", action="store_true", help="the small demo of tools/quick.py, 2 heads, 1 epoch (CI)")
    a = ap.parse_args()
    heads = [1, 2, 3, 4, 5]
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        a.work, a.epochs, heads = str(quick_demo()), 1, [1, 2]
    w, model = Path(a.work), str(DEMO / "stories260K")
    w.mkdir(parents=True, exist_ok=True)
    if not (w / "stories.jsonl").exists():
        generate(GenerateConfig(model=model, prompts=str(DEMO / "prompts.jsonl"), out=str(w / "stories.jsonl"),
                                max_new_tokens=200, batch_size=40))
    if not is_store(w / "cache.zarr"):
        run_dump(DumpConfig(model=model, data=[str(w / "stories.jsonl")], out=str(w / "cache.zarr"), dtype="float32",
                            max_length=512))
    lines = ["| lm_head init | distill | heads | chain tokens/step | tree16 tokens/step | tree32 tokens/step | "
             "tree64 tokens/step | tree32 per-position acceptance | top-1 per head |",
             "|---|---|---|---|---|---|---|---|---|"]
    for init in (False, True):
        for distill in (False, True):
            cfg = TrainConfig(cache=str(w / "cache.zarr"), out=str(w / f"table-init{int(init)}-distill{int(distill)}"),
                              **{**recipe(), "epochs": a.epochs}, init_from_lm_head=model if init else None,
                              distill=model if distill else None, overwrite=True)
            res = run_ablate(cfg, AblateConfig(heads=heads, tree_budget=[16, 32, 64],
                                               heldout_prompts=str(DEMO / "heldout_prompts.jsonl"),
                                               heldout_tokens=128))
            for r in res["results"]:
                t = r["trees"]
                lines.append(f"| {'yes' if init else 'no'} | {'yes' if distill else 'no'} | {r['num_heads']} | "
                             f"{r['chain_tokens_per_step']:.3f} | {t['16']['tokens_per_step']:.3f} | "
                             f"{t['32']['tokens_per_step']:.3f} | {t['64']['tokens_per_step']:.3f} | "
                             f"{t['32']['acceptance']:.3f} | " + " ".join(f"{x:.3f}" for x in r["top1"]) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
