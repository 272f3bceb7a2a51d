"""Batches of mixed positions vs contiguous pieces: held-out quality at equal epochs, and training speed.

    python tools/bench_mix.py --cache medusa-cache-demo/cache.zarr --init-from-lm-head medusa_cache/demo/stories260K
    python tools/bench_mix.py --stories 2700 --work /tmp/mix --epochs 20 --lr 1e-3   # a larger self-generated set
    python tools/bench_mix.py --quick     # seconds: the small demo of tools/quick.py, 1 seed (what CI runs)

Trains the same heads (same seed, epochs, lr, --batch-tokens) with ``--mix pieces`` and ``--mix positions`` and
scores both on the same held-out sequences (the train split's validation sequences): top-1 per head (eval's
definition), chain acceptance and a fitted 16-node tree (position-averaged, teacher-forced), plus optimizer steps and
tokens/s. Several seeds give the spread. ``--stories N`` first writes N distinct story openings, lets stories260K
continue each greedily (``medusa-cache generate``) and dumps them (``--work``; reused when present). Prints a
markdown table; the two modes are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STORIES = Path(__file__).resolve().parents[1] / "medusa_cache" / "demo" / "stories260K"


def make_stories(work: Path, n: int) -> str:
    """n distinct openings (name x thing x place), continued greedily by stories260K, dumped in float32."""
    import itertools

    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.store import is_store

    work.mkdir(parents=True, exist_ok=True)
    names = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam", "Lucy", "Tim", "Zoe", "Jack", "Amy", "Leo",
             "Kate"]
    things = ["red ball", "big tree", "small bird", "blue car", "soft toy", "little dog", "shiny stone", "new hat",
              "old book", "green kite", "funny cat", "yellow boat"]
    places = ["park", "garden", "forest", "beach", "house", "school", "farm", "lake", "town", "hill", "river",
              "shop", "zoo", "field", "cave"]
    girls = {"Lily", "Sue", "Mia", "Anna", "Lucy", "Zoe", "Amy", "Kate"}
    prompts = [f"Once upon a time, there was a {'girl' if nm in girls else 'boy'} named {nm}. One day, {nm} took a "
               f"{th} to the {pl}."
               for nm, th, pl in itertools.product(names, things, places)][:n]
    pf = work / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    stories, cache = work / "stories.jsonl", work / "cache.zarr"
    generate(GenerateConfig(model=str(STORIES), prompts=str(pf), out=str(stories), max_new_tokens=200, batch_size=64,
                            resume=stories.exists()))
    if not is_store(cache):
        run_dump(DumpConfig(model=str(STORIES), data=[str(stories)], out=str(cache), dtype="float32",
                            max_length=512, resume=is_store(cache, partial=True)))
    return str(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--stories", type=int, default=0, help="generate and dump this many stories into --work")
    ap.add_argument("--work", default="/tmp/bench_mix")
    ap.add_argument("--init-from-lm-head", default=None)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--mix-tokens", type=int, default=65536)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--mixes", nargs="+", default=["pieces", "positions"], choices=["pieces", "positions"])
    ap.add_argument("--quick", action="store_true", help="the small demo of tools/quick.py, one seed (what CI runs)")
    a = ap.parse_args()
    if a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        a.cache, a.init_from_lm_head = str(quick_demo() / "cache.zarr"), str(STORIES)
        a.heads, a.epochs, a.seeds, a.batch_tokens, a.mix_tokens = 2, 1, [0], 512, 4096

    from medusa_cache.evaluate import evaluate_ranks, head_ranks
    from medusa_cache.headsdir import load_heads
    from medusa_cache.store import Cache
    from medusa_cache.train import TrainConfig, split, train

    if not a.cache:
        a.cache = make_stories(Path(a.work), a.stories)
        a.init_from_lm_head = a.init_from_lm_head or str(STORIES)
    cache = Cache(a.cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for mix in a.mixes:
                cfg = TrainConfig(cache=a.cache, out=str(Path(tmp) / f"{mix}{seed}"), num_heads=a.heads,
                                  epochs=a.epochs, lr=a.lr, batch_tokens=a.batch_tokens, grad_accum=1,
                                  val_fraction=0.1, seed=seed, mix=mix, mix_tokens=a.mix_tokens,
                                  init_from_lm_head=a.init_from_lm_head)
                t0 = time.perf_counter()
                res = train(cfg)
                dt = time.perf_counter() - t0
                _, val = split(cache, cfg)
                heads = load_heads(cfg.out)[0]
                ev = evaluate_ranks(head_ranks(heads, cache, val), a.heads, 10, [16])
                rows.append({"seed": seed, "mix": mix, "top1": ev["top1"], "chain": ev["chain_acceptance"],
                             "tree16": ev["trees"]["16"]["acceptance"], "steps": res.get("step"),
                             "seconds": round(dt, 1), "val_positions": ev["positions"]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\ncache {a.cache}: {cache.n_tokens} tokens; {a.heads} heads, {a.epochs} epochs, lr {a.lr}, "
          f"--batch-tokens {a.batch_tokens}, seeds {a.seeds}; held-out = the train split's validation sequences\n")
    print("| mix | top-1 per head (mean over seeds) | chain | tree16 | optimizer steps | train seconds |")
    print("|---|---|---|---|---|---|")
    for mix in a.mixes:
        rs = [r for r in rows if r["mix"] == mix]
        top1 = np.mean([r["top1"] for r in rs], axis=0)
        chain, tree = [r["chain"] for r in rs], [r["tree16"] for r in rs]
        print(f"| {mix} | {' '.join(f'{x:.3f}' for x in top1)} | {np.mean(chain):.3f} (min {min(chain):.3f}, "
              f"max {max(chain):.3f}) | {np.mean(tree):.3f} | {rs[0]['steps']} | "
              f"{np.mean([r['seconds'] for r in rs]):.1f} |")
    if len(a.mixes) == 2:
        d = [np.array(b["top1"]) - np.array(p["top1"]) for p, b in zip(rows[::2], rows[1::2], strict=True)]
        print(f"\npositions - pieces, top-1 per head, per seed: {[np.round(x, 3).tolist() for x in d]}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
