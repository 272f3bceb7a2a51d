"""``medusa-cache demo``: the whole path on a real pretrained model, offline, on the CPU, in a few minutes.

stories260K (shipped in ``medusa_cache/demo/``) continues 120 story openings greedily (self-distilled
data, as the Medusa authors recommend when the base model's training data is not at hand), the stories
are dumped into a cache, and heads are ablated over 1..5 heads with lm_head initialisation. The
acceptance table is printed and written to ``OUT/ablate/report.md``. Finally the best heads and their
tree (chosen by expected speedup) decode 8 held-out openings for real (``speculate``): measured tokens per step, the
speedup on this CPU, and whether the output is identical to greedy decoding. Rerunning reuses finished steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .ablate import AblateConfig, run_ablate
from .config import check, check_common
from .dump import DumpConfig, run_dump
from .generate import GenerateConfig, generate
from .store import is_store
from .train import TrainConfig

DEMO = Path(__file__).parent / "demo"


@dataclass
class DemoConfig:
    """medusa-cache demo --out /tmp/demo --epochs 4"""

    out: str = "medusa-cache-demo"
    """working directory"""
    epochs: int | None = None
    """training epochs (default: the demo recipe's, medusa_cache/demo/train.json: 4)"""
    threads: int | None = None
    """CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share"""

    def __post_init__(self) -> None:
        check_common(self)
        check(self.epochs is None or self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")


def reconcile(best: dict, spec: dict) -> str:
    """The demo's numbers in one explanation: tokens per step from the cache against measured decoding on the same
    prompts, and the wall speedup, each from what was measured."""
    return (f"numbers, each measured:\n"
            f"  {best['tokens_per_step']:.3f} tokens per step from the cache ({best['num_heads']} heads, "
            f"{best['tree']}):"
            " the decoding walk over the heads' ranks on the model's own greedy answers to the held-out openings;\n"
            f"  {spec['tokens_per_step']:.3f} tokens per step measured by decoding the same openings for real "
            f"(speculate);\n"
            f"  ({best['per_position_acceptance']:.3f} per-position acceptance: the average over every position, "
            "an upper bound, since decoding skips the positions inside each accepted run);\n"
            f"  {spec['speedup']:.2f}x wall speedup = {spec['tokens_per_step']:.2f} tokens per step / "
            f"{spec['step_cost_ratio']:.2f}, the measured cost of one Medusa step (tree verification + heads) over "
            "one greedy step on this CPU (a GPU at batch 1 verifies a tree for little more than one token).\n"
            f"identical to greedy: {'yes' if spec['identical_to_greedy'] else 'NO'}")


def _plot_measured(ablate_dir: Path, best: dict, spec: dict) -> None:
    """Redraw ablate's acceptance.png with the measured tokens per step of the decoded heads as a star."""
    import json

    from .ablate_plots import plot

    res = json.loads((ablate_dir / "results.json").read_text())
    rows = res["results"]
    for r in rows:
        if r["variant"] == best["variant"] and r["num_heads"] == best["num_heads"]:
            r["measured"] = {"tokens_per_step": spec["tokens_per_step"]}
    budgets = sorted(int(n) for n in rows[0]["trees"])
    plot(rows, budgets, ablate_dir / "acceptance.png", "stories260K demo; star: measured by speculate")


def recipe() -> dict:
    """The demo's training settings, held once in ``demo/train.json``: the demo and the tools that rerun its
    ablation (``tools/demo_table.py``, ``tools/bf16_drift.py``) train with them."""
    from .config import load_config_file

    return load_config_file(DEMO / "train.json", TrainConfig)


def run_demo(cfg: DemoConfig, max_new_tokens: int = 200) -> dict:
    """Generate, dump, ablate and speculate into ``cfg.out``; the ablate summary and the decoding."""
    from .rundir import own_dir

    o = own_dir(cfg.out, "demo")
    settings = {**recipe(), **({"epochs": cfg.epochs} if cfg.epochs else {})}
    epochs = settings["epochs"]
    model = str(DEMO / "stories260K")
    stories = o / "stories.jsonl"
    print(f"[1/4] generate: stories260K continues {DEMO / 'prompts.jsonl'} -> {stories}")
    generate(GenerateConfig(model=model, prompts=str(DEMO / "prompts.jsonl"), out=str(stories),
                            max_new_tokens=max_new_tokens, batch_size=40, resume=stories.exists()), within=o)
    cache = o / "cache.zarr"
    print(f"[2/4] dump: hidden states after the final norm -> {cache}")
    run_dump(DumpConfig(model=model, data=[str(stories)], out=str(cache), dtype="float32", max_length=512,
                        resume=is_store(cache, partial=True)))
    print(f"[3/4] ablate: 1..5 heads, lm_head init, {epochs} epochs -> {o / 'ablate'}")
    train_cfg = TrainConfig(cache=str(cache), out=str(o / "ablate"), init_from_lm_head=model,
                            overwrite=(o / "ablate").exists(), **settings)
    heldout = DEMO / "heldout_prompts.jsonl"
    summary = run_ablate(train_cfg, AblateConfig(heads=[1, 2, 3, 4, 5], tree_budget=[16, 32, 64],
                                                 heldout_prompts=str(heldout), heldout_tokens=128))
    from .speculate import SpeculateConfig, render, run_speculate

    best = summary["best"]
    tree = o / "ablate" / "best" / "tree.json"
    print(f"[4/4] speculate: best heads ({best['num_heads']}, {best['tree']}) decode {heldout}")
    spec = run_speculate(SpeculateConfig(model=model, heads=str(o / "ablate" / "best"), prompts=str(heldout),
                                         tree=str(tree), max_new_tokens=128, out=str(o / "speculate")))
    print(render(spec))
    print(reconcile(best, spec))
    _plot_measured(o / "ablate", best, spec)
    a = o / "ablate"
    print("outputs: " + ", ".join(str(p) for p in (
        stories, cache, a / "report.md", a / "results.json", a / "acceptance.png", a / "best", a / "best-vllm",
        a / "trees", a / "heldout", o / "speculate" / "report.md")))
    return {**summary, "speculate": spec}
