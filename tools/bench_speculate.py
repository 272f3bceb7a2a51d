"""Real Medusa decoding on the CPU: tokens per step, step cost and wall speedup, chain and trees 16/32/64.

Two models: stories260K with the demo's heads (run `medusa-cache demo` first, or pass --demo DIR), and a larger
random tiny Llama (hidden 512, 8 layers, stories260K's tokenizer) with heads trained briefly on its own greedy
text. Every row is one `speculate` run (greedy and Medusa alternated per prompt in one process, after a warm-up).
speedup = tokens per step / step cost, where step cost = one Medusa step (tree forward + heads) over one greedy
step (one-token forward), both measured in the same run.

    python tools/bench_speculate.py [--demo medusa-cache-demo] [--prompts 8] [--max-new-tokens 96]
    python tools/bench_speculate.py --quick     # seconds: small demo, small random Llama (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from medusa_cache.acceptance import tree_path  # noqa: E402
from medusa_cache.demo import DEMO  # noqa: E402
from medusa_cache.speculate import SpeculateConfig, run_speculate  # noqa: E402


def rows(name: str, model: str, heads: Path, trees: dict[str, Path], args) -> list[str]:
    out = []
    for label, tree in [("chain", None), *trees.items()]:
        r = run_speculate(SpeculateConfig(model=model, heads=str(heads), prompts=str(DEMO / "heldout_prompts.jsonl"),
                                          chain=tree is None, tree=str(tree) if tree else None,
                                          max_new_tokens=args.max_new_tokens, max_prompts=args.prompts))
        out.append(f"| {name} | {label} | {r['nodes']} | {r['tokens_per_step']:.3f} | {r['step_cost_ratio']:.3f} | "
                   f"{r['speedup']:.3f} | {'yes' if r['identical_to_greedy'] else 'NO'} |")
        print(out[-1], flush=True)
    return out


def larger_model(work: Path, quick: bool = False) -> tuple[str, Path, dict[str, Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.evaluate import EvalConfig, run_eval
    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.train import TrainConfig, train

    torch.manual_seed(0)
    m = work / "llama512"
    hidden, layers = (64, 2) if quick else (512, 8)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=128 if quick else 1376,
                                 num_hidden_layers=layers,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                                 tie_word_embeddings=False)).save_pretrained(m)
    for f in (DEMO / "stories260K").glob("tokenizer*"):
        shutil.copy(f, m / f.name)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join((DEMO / "prompts.jsonl").read_text().splitlines(keepends=True)[:24 if quick else None]))
    generate(GenerateConfig(model=str(m), prompts=str(prompts), out=str(work / "g.jsonl"),
                            max_new_tokens=32 if quick else 96, batch_size=40))
    run_dump(DumpConfig(model=str(m), data=[str(work / "g.jsonl")], out=str(work / "c"), dtype="float32",
                        max_length=512))
    train(TrainConfig(cache=str(work / "c"), out=str(work / "h"), num_heads=5, epochs=1 if quick else 3, lr=3e-3,
                      batch_tokens=1024,
                      grad_accum=1, val_fraction=0.1))
    run_eval(EvalConfig(str(work / "h"), str(work / "c"), tree_budget=[16, 32, 64], trees_out=str(work / "trees")))
    return str(m), work / "h", {f"tree{n}": tree_path(work / "trees", n) for n in (16, 32, 64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default="medusa-cache-demo", help="output directory of `medusa-cache demo`")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="small demo, small model, 2 prompts (what CI runs)")
    args = ap.parse_args()
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from quick import quick_demo

        args.demo, args.prompts, args.max_new_tokens = str(quick_demo()), 2, 16
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| model | tree | nodes | tokens/step | step cost / greedy step | wall speedup | identical |")
    print("|---|---|---|---|---|---|---|")
    demo = Path(args.demo) / "ablate"
    if (demo / "results.json").exists():
        best = json.loads((demo / "results.json").read_text())["best"]
        trees = {f"tree{n}": tree_path(demo / "trees", n, f"{best['variant']}_heads{best['num_heads']}_tree")
                 for n in (16, 32, 64)}
        rows("stories260K (demo heads)", str(DEMO / "stories260K"), demo / "best", trees, args)
    else:
        print(f"(no demo results in {args.demo}: run `medusa-cache demo` for the stories260K rows)")
    work = Path(tempfile.mkdtemp())
    model, heads, trees = larger_model(work, args.quick)
    rows("random Llama H64 L2 (quick)" if args.quick else "random Llama H512 L8 (own greedy text)", model, heads,
         trees, args)


if __name__ == "__main__":
    main()
