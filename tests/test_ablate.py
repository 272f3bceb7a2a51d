"""Acceptance on hand-made cases, fitted trees, and the one-run head-count ablation."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import learnable_cache

from medusa_cache import store
from medusa_cache.ablate import AblateConfig, run_ablate
from medusa_cache.acceptance import chain_acceptance, fit_tree, tree_acceptance, validate_tree
from medusa_cache.errors import UserError
from medusa_cache.evaluate import evaluate_ranks, head_ranks, topk_accuracy
from medusa_cache.heads import MedusaHeads
from medusa_cache.train import TrainConfig, train
from medusa_cache.vocab import IGNORE, VocabMapping

RANK = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0], [0, 0, 0]])


def test_chain_counts_consecutive_top1_hits_from_head_0():
    # accepted draft tokens per row: 2, 0 (head 0 wrong), 1 (head 1 misses), 3
    assert chain_acceptance(RANK) == pytest.approx(1 + (2 + 0 + 1 + 3) / 4)
    assert chain_acceptance(RANK[:, :1]) == pytest.approx(1 + 3 / 4)


def test_tree_takes_the_longest_fully_matching_path():
    tree = validate_tree([[0], [0, 0], [1], [0, 0, 0], [0, 1]], 3)
    # row0 (0,0) then (0,0,1) not in tree -> 2; row1 (1,) -> 1; row2 (0,) -> 1; row3 (0,0,0) -> 3
    assert tree_acceptance(RANK, tree) == pytest.approx(1 + (2 + 1 + 1 + 3) / 4)
    assert tree_acceptance(RANK, validate_tree([[0]], 3)) == pytest.approx(1 + 3 / 4)
    assert tree_acceptance(RANK, [(0,), (0, 0), (0, 0, 0)]) == pytest.approx(chain_acceptance(RANK))


def test_tree_files_must_be_prefix_closed():
    with pytest.raises(UserError, match="has no parent"):
        validate_tree([[0], [1, 0]], 3)
    with pytest.raises(UserError, match="must have 1..2"):
        validate_tree([[0], [0, 0], [0, 0, 0]], 2)


def test_fitted_tree_is_the_most_frequent_prefix_closed_nodes_ties_to_shorter():
    rank = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0], [2, -1]])
    # frequencies: (0,)3 (1,)2 (0,0)2 (1,0)2 (2,)1 (0,1)1
    assert fit_tree(rank, 1, 10) == [(0,)]
    assert fit_tree(rank, 3, 10) == [(0,), (1,), (0, 0)]
    assert fit_tree(rank, 4, 10) == [(0,), (1,), (0, 0), (1, 0)]
    full = fit_tree(rank, 100, 10)
    assert len(full) == 6 and tree_acceptance(rank, full) == pytest.approx(1 + (2 + 2 + 2 + 2 + 2 + 1) / 6)


def test_topk_accuracy_counts_out_of_vocab_targets_as_misses():
    rank = np.array([[0], [3], [-1], [-1]])
    has = np.array([[True], [True], [True], [False]])  # row 2: assistant token outside the draft vocab
    acc = topk_accuracy(rank, has, (1, 5))
    assert acc[1] == [pytest.approx(1 / 3, abs=1e-4)] and acc[5] == [pytest.approx(2 / 3, abs=1e-4)]


def test_head_ranks_on_a_hand_built_cache(tmp_path):
    """H = D = 8, identity heads: head 0's top-1 is argmax(hidden), set to the token two ahead."""
    labels = np.array([IGNORE, 3, 5, IGNORE, 1, 2, 7, 4], dtype=np.int32)
    mask = np.array([0, 1, 1, 1, 1, 1, 1, 1], dtype=bool)  # row 3: assistant, outside the draft vocab
    hidden = torch.zeros(8, 8)
    for t, cls in enumerate([5, 0, 1, 2, 7, 0, 0, 0]):  # row t predicts labels[t+2]; row 5 guesses wrong
        hidden[t, cls] = 1.0
    mapping = VocabMapping(np.zeros(8, dtype=np.int64), np.ones(8, dtype=bool))
    contents = store.Contents(np.where(labels < 0, 0, labels), mask, labels, np.array([0, 8]), np.zeros((1, 2)),
                              mapping, np.zeros(8))
    c = store.create(tmp_path / "c", store.HiddenFormat(8, "float32"), store.Layout(8, 8), contents,
                     {"vocab_size": 8, "draft_vocab_size": 8, "fingerprints": {"model": "x"}})
    c.write_unit(0, hidden)
    c.mark_done(0)
    heads = MedusaHeads(8, 8, 1, 1)
    with torch.no_grad():
        heads.heads[0][0].linear.bias.zero_()
        heads.heads[0][1].weight.copy_(10 * torch.eye(8))
    r = head_ranks(heads, c, np.array([0]), topk=3)
    # positions t with loss_mask[t+1]: t = 0..6; targets t+2 = rows 2..7, then past the end
    # t=1: target row 3 is outside the draft vocab (miss); t=5: wrong guess; t=6: sequence ends (no target)
    assert r["rank"][:, 0].tolist() == [0, -1, 0, 0, 0, -1, -1]
    assert r["has_target"][:, 0].tolist() == [True, True, True, True, True, True, False]
    acc = topk_accuracy(r["rank"], r["has_target"], (1,))[1][0]
    assert acc == pytest.approx(4 / 6, abs=1e-4)


def test_k_heads_from_a_5_head_ablation_equal_a_separate_k_head_run(tmp_path):
    learnable_cache(tmp_path / "c")
    common = dict(cache=str(tmp_path / "c"), lr=1e-2, epochs=2, batch_tokens=256, grad_accum=2, val_fraction=0.2,
                  max_grad_norm=0.05)  # a small clip so the per-head clip really binds
    with pytest.raises(UserError, match="--verify-cost: the expected speedup needs .* not a model directory here"):
        # a synthetic cache: no model to time the verification with, refused up front
        run_ablate(TrainConfig(out=str(tmp_path / "abl"), **common),
                   AblateConfig(heads=[1, 3, 5], layers=[1], lr=[1e-2], tree_budget=[4, 8]))
    assert not (tmp_path / "abl").exists()
    run_ablate(TrainConfig(out=str(tmp_path / "abl"), **common),
               AblateConfig(heads=[1, 3, 5], layers=[1], lr=[1e-2], tree_budget=[4, 8], verify_cost=0.01))
    train(TrainConfig(out=str(tmp_path / "three"), num_heads=3, clip_per_head=True, **common))
    five = load_file(str(tmp_path / "abl" / "variants" / "L1_lr0.01" / "medusa_lm_head.safetensors"))
    three = load_file(str(tmp_path / "three" / "medusa_lm_head.safetensors"))
    assert set(three) == {k for k in five if int(k.split(".")[0]) < 3}
    for k in three:
        assert torch.equal(three[k], five[k]), k
    # and the report files
    out = tmp_path / "abl"
    res = json.loads((out / "results.json").read_text())
    assert [r["num_heads"] for r in res["results"]] == [1, 3, 5]
    assert res["results"][0]["top1"][0] > 0.15  # head 0 learns the synthetic task (chance: 0.025)
    report = (out / "report.md").read_text()
    assert "| 1 layer, lr 1e-2 | 5 |" in report and "tree8" in report
    tree = json.loads((out / "trees" / "L1_lr0.01_heads5_tree_8.json").read_text())
    assert validate_tree(tree, 5) and len(tree) <= 8
    assert (out / "best" / "medusa_lm_head.safetensors").exists() and (out / "best-vllm" / "config.json").exists()
    from PIL import Image

    with Image.open(out / "acceptance.png") as im:
        im.verify()
        assert im.size[0] > 100


def test_every_row_scores_the_heads_its_variant_wrote(tmp_path):
    """ablate evaluates the heads it trained from memory (it does not read them back): each row's top-1 per head is
    what `eval` measures on that variant's written heads, for every variant and head count."""
    from medusa_cache.evaluate import EvalConfig, run_eval

    learnable_cache(tmp_path / "c")
    learnable_cache(tmp_path / "v", seed=1)
    common = dict(cache=str(tmp_path / "c"), val_cache=str(tmp_path / "v"), epochs=1, batch_tokens=256, grad_accum=1)
    res = run_ablate(TrainConfig(out=str(tmp_path / "abl"), **common),
                     AblateConfig(heads=[2, 3], layers=[1], lr=[1e-2, 1e-3], tree_budget=[4], verify_cost=0.01))
    assert len({r["variant"] for r in res["results"]}) == 2
    for r in res["results"]:
        ev = run_eval(EvalConfig(heads=r["dir"], cache=str(tmp_path / "v"), tree_budget=[4]))
        assert r["top1"] == ev["top1"][: r["num_heads"]], (r["variant"], r["num_heads"])
    a, b = ({r["variant"]: r["top1"] for r in res["results"] if r["num_heads"] == 3}).values()
    assert a != b  # the two variants' heads differ, so a swap would show


def test_evaluate_ranks_reports_held_out_trees():
    rng = np.random.default_rng(0)
    rank = np.where(rng.random((400, 3)) < 0.6, 0, rng.integers(-1, 4, (400, 3)))
    r = {"rank": rank, "has_target": np.ones_like(rank, bool), "seq": np.arange(400) // 10}
    res = evaluate_ranks(r, 3, 10, [4, 16])
    t4, t16 = ({tuple(p) for p in res["trees"][n]["tree"]} for n in ("4", "16"))
    assert {(0,), (0, 0), (0, 0, 0)} <= t16 and t4 <= t16  # the chain and the smaller tree are inside
    # a tree that contains another accepts at least as much on every row, so no tolerance is needed
    assert res["trees"]["16"]["acceptance"] >= res["trees"]["4"]["acceptance"]
    assert res["trees"]["16"]["acceptance"] >= res["chain_acceptance"]
    assert res["trees"]["4"]["nodes"] == 4


def test_ablate_takes_lr_and_layers_from_its_config_file(tmp_path, monkeypatch):
    """The variants run_ablate really trains (its own defaulting, not a copy of it): --lr/--layers when given, else
    the config file's single values; other settings from the file."""
    import medusa_cache.ablate as ab
    from medusa_cache.cli import main

    learnable_cache(tmp_path / "c")
    seen = []

    def stop(cfg, specs, **kw):  # the first training call: what would be trained, then stop before any work
        seen.append((cfg, specs))
        raise UserError("stopped by the test")

    monkeypatch.setattr(ab, "train", stop)
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"lr": 3e-3, "num_layers": 2, "epochs": 2}))
    base = ["ablate", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--config", str(conf),
            "--verify-cost", "0.01"]
    assert main(base) == 2
    cfg, specs = seen[-1]
    assert [(la, lr) for _, la, lr in specs] == [(2, 3e-3)] and cfg.epochs == 2 and cfg.num_heads == 5
    assert main([*base, "--lr", "1e-3,2e-3", "--layers", "1,3"]) == 2
    cfg, specs = seen[-1]
    assert [(la, lr) for _, la, lr in specs] == [(1, 1e-3), (1, 2e-3), (3, 1e-3), (3, 2e-3)] and cfg.epochs == 2


def test_bootstrap_resamples_sequences_not_positions():
    from medusa_cache.acceptance import bootstrap_ci

    # 40 sequences of 50 positions; each sequence is all 1s or all 3s: positions are perfectly correlated
    seq = np.repeat(np.arange(40), 50)
    values = np.where(seq % 2 == 0, 1.0, 3.0)
    lo, hi = bootstrap_ci(values, seq)
    assert lo < 2.0 < hi and hi - lo > 0.4  # a position bootstrap would give a width near 0.08
    assert bootstrap_ci(np.full(10, 2.0), np.zeros(10, int)) == [2.0, 2.0]


@pytest.mark.slow
def test_ablate_chooses_by_the_tokens_per_step_decoding_measures_on_held_out_prompts(tmp_path):
    """--heldout-prompts: every variant is scored on the model's own answers to those prompts; the figure from the
    cache is the one speculate then measures on the same prompts (equal, option by option), and the best is the
    highest tokens per step over the cost of a step."""
    from conftest import STORIES, write_jsonl

    from medusa_cache.ablate import run_ablate
    from medusa_cache.demo import DEMO
    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.train import TrainConfig

    rows = [json.loads(x) for x in (DEMO / "prompts.jsonl").read_text().splitlines()[:30]]
    generate(GenerateConfig(model=str(STORIES), prompts=str(write_jsonl(tmp_path / "o.jsonl", rows)),
                            out=str(tmp_path / "s.jsonl"), max_new_tokens=40))
    run_dump(DumpConfig(model=str(STORIES), data=[str(tmp_path / "s.jsonl")], out=str(tmp_path / "c"),
                        dtype="float32", max_length=512))
    # openings of the training stories: heads trained on their continuations are accepted, so the figures differ
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": r["text"]} for r in rows[:3]])
    out = tmp_path / "abl"
    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(out), epochs=6, lr=1e-2, batch_tokens=512, grad_accum=1,
                      val_fraction=0.2)
    res = run_ablate(cfg, AblateConfig([1, 2], [1], [3e-3], [4, 8], speculate_prompts=str(prompts),
                                       speculate_tokens=20, heldout_prompts=str(prompts), heldout_tokens=20))
    for r in res["results"]:
        m = r["measured"]
        assert m["identical_to_greedy"]
        cached = next(o for o in r["options"] if o["name"] == m["tree"])
        assert cached["tokens_per_step"] == pytest.approx(m["tokens_per_step"], abs=1e-3), (r["num_heads"], m)
        assert r["sequences"] == 3  # scored on the answered prompts, not on the validation split
    assert max(o["tokens_per_step"] for r in res["results"] for o in r["options"]) > 1.2
    c = res["verify_cost_per_node"]
    speedups = {(r["num_heads"], o["name"]): o["tokens_per_step"] / (1 + c * o["nodes"] + r["head_cost"])
                for r in res["results"] for o in r["options"]}
    best = res["best"]
    assert speedups[(best["num_heads"], best["tree"])] == pytest.approx(max(speedups.values()), abs=1e-4)
    assert best["expected_speedup"] == pytest.approx(speedups[(best["num_heads"], best["tree"])], abs=1e-4)
    report = (out / "report.md").read_text()
    assert "Measured by real decoding" in report and "Rule: best = highest expected speedup = tokens per step" in report
    assert "| 1 layer, lr 3e-3 | 2 | " in report and "chain tokens/step" in report
    assert "Warning:** the held-out set has only 3 sequences" in report
    assert (out / "heldout" / "cache.zarr").is_dir() and len((out / "heldout" / "answers.jsonl").read_text()
                                                            .splitlines()) == 3
    card = (out / "best" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: medusa-cache" in card
    assert "## Tokens per decoding step (held out)" in card and f"**{best['tokens_per_step']:.3f} tokens per step**" \
        in card
    # provenance is the command that ran: this ablate, and which heads of which variant best/ holds
    k = best["num_heads"]
    assert "medusa-cache train" not in card and "--clip-per-head" not in card
    assert re.search(rf"medusa-cache ablate --cache \S+ --out \S+ .*--heads 1,2 --layers 1 --lr 0.003 .*"
                     rf"--heldout-prompts \S+p.jsonl .*# best/: the first {k} heads of variant L1_lr0.003", card)
    assert json.loads((out / "best" / "config.json").read_text())["provenance"]["train"]["num_heads"] == k
    assert "speculative_config" in (out / "best-vllm" / "README.md").read_text()
    from PIL import Image

    with Image.open(out / "acceptance.png") as im:
        assert im.size[0] > im.size[1]


def _option(name: str, tps: float, ci: list[float], speedup: float) -> dict:
    return {"name": name, "tokens_per_step": tps, "tokens_per_step_ci": ci, "expected_speedup": speedup}


def test_a_held_out_set_of_a_few_sequences_or_overlapping_intervals_is_called_out():
    from medusa_cache.ablate_report import separation_warning

    opt, other = _option("chain", 3.0, [2.9, 3.1], 2.9), _option("tree16", 2.0, [1.9, 2.1], 1.9)
    row = {"variant": "L1_lr0.003", "label": "1 layer, lr 3e-3", "num_heads": 5, "sequences": 2, "positions": 400,
           "options": [opt, other]}
    assert "only 2 sequences" in separation_warning([row], row, opt)
    assert "give more prompts in --heldout-prompts" in separation_warning([row], row, opt, prompts=True)
    row["sequences"] = 12  # enough sequences and intervals apart: no warning
    assert separation_warning([row], row, opt) is None
    # disjoint, with the runner-up's interval below the best's (the case that was called overlapping)
    row["options"] = [_option("chain", 1.043, [1.04, 1.05], 1.0), _option("tree16", 1.021, [1.02, 1.02], 0.99)]
    assert separation_warning([row], row, row["options"][0]) is None
    row["options"][1]["tokens_per_step_ci"] = [1.02, 1.04]  # touching: they overlap
    assert "overlap" in separation_warning([row], row, row["options"][0])


def test_ablate_times_the_verification_cost_instead_of_assuming_one(tmp_path):
    """No --verify-cost and no --speculate-prompts: the cost per tree node is timed with the cache's model on the
    device (forwards of 1 and of N tokens over a KV cache), and the rule says so; never a constant."""
    from conftest import STORIES, write_jsonl

    from medusa_cache.demo import DEMO
    from medusa_cache.dump import DumpConfig, run_dump

    rows = [json.loads(x) for x in (DEMO / "prompts.jsonl").read_text().splitlines()[:12]]
    run_dump(DumpConfig(model=str(STORIES), data=[str(write_jsonl(tmp_path / "s.jsonl", rows))],
                        out=str(tmp_path / "c"), dtype="float32", max_length=256))
    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "abl"), epochs=1, lr=3e-3, batch_tokens=512,
                      grad_accum=1, val_fraction=0.3)
    res = run_ablate(cfg, AblateConfig([1, 2], [1], [3e-3], [4, 8]))
    m = re.search(r"timed on this device \(cpu\): a 1-token step ([\d.]+) ms, a (\d+)-token step ([\d.]+) ms",
                  res["best"]["rule"])
    assert m, res["best"]["rule"]
    t1, n, tn = float(m[1]), int(m[2]), float(m[3])
    assert n == 8  # the largest tree budget
    # the cost per node is what those two timings say (to the rounding of the printed milliseconds)
    assert res["verify_cost_per_node"] == pytest.approx(max(0.0, (tn / t1 - 1) / n),
                                                        abs=0.01 * (1 + tn / t1) / t1 / n + 1e-4)


def test_data_fractions_are_nested_seeded_prefixes_and_one_is_everything():
    from medusa_cache.traindata import subset

    seqs = np.arange(3, 103)
    subsets = {f: subset(seqs, f, seed=7) for f in (0.125, 0.25, 0.5, 1.0)}
    assert [len(x) for x in subsets.values()] == [13, 25, 50, 100]
    assert set(subsets[0.125]) <= set(subsets[0.25]) <= set(subsets[0.5]) <= set(subsets[1.0])
    assert subsets[1.0] is seqs and np.array_equal(subset(seqs, 0.5, seed=7), subsets[0.5])
    assert not np.array_equal(subset(seqs, 0.5, seed=8), subsets[0.5])  # another seed, another subset


def test_data_fraction_ablation_rows_equal_plain_runs_on_the_same_subsets(tmp_path):
    """Fraction 1 is the plain run; a fraction's K-head variant is a separate K-head run with that --data-fraction
    (bit for bit); every fraction x head count is one row, with the learning curve in the report and data.png."""
    learnable_cache(tmp_path / "c")
    common = dict(cache=str(tmp_path / "c"), lr=1e-2, epochs=2, batch_tokens=256, grad_accum=2, val_fraction=0.2)
    out = tmp_path / "abl"
    res = run_ablate(TrainConfig(out=str(out), **common),
                     AblateConfig(heads=[1, 2, 3], layers=[1], lr=[1e-2], tree_budget=[4], verify_cost=0.01,
                                  data_fraction=[0.25, 0.5, 1.0]))
    assert sorted({(r["data_fraction"], r["num_heads"]) for r in res["results"]}) == \
        [(f, k) for f in (0.25, 0.5, 1.0) for k in (1, 2, 3)]
    tokens = {r["data_fraction"]: r["train_tokens"] for r in res["results"]}
    assert tokens[0.25] < tokens[0.5] < tokens[1.0]
    heads = {f: load_file(str(out / "runs" / f"F{f:g}" / "variants" / f"F{f:g}_L1_lr0.01" /
                              "medusa_lm_head.safetensors")) for f in (0.5, 1.0)}
    train(TrainConfig(out=str(tmp_path / "plain"), num_heads=3, clip_per_head=True, **common))
    train(TrainConfig(out=str(tmp_path / "half2"), num_heads=2, clip_per_head=True, data_fraction=0.5, **common))
    for ref, got in ((tmp_path / "plain", heads[1.0]), (tmp_path / "half2", heads[0.5])):
        want = load_file(str(ref / "medusa_lm_head.safetensors"))
        assert set(want) == {k for k in got if int(k.split(".")[0]) < len(set(int(x.split(".")[0]) for x in want))}
        for k in want:
            assert torch.equal(want[k], got[k]), (ref.name, k)
    assert not torch.equal(heads[0.5]["0.1.weight"], heads[1.0]["0.1.weight"])  # the subsets differ
    report = (out / "report.md").read_text()
    assert "Learning curve (tree4 tokens per step" in report and "slope per doubling" in report
    assert "| data 1/4, 1 layer, lr 1e-2 | 3 |" in report
    assert (out / "data.png").stat().st_size > 1000


@pytest.mark.parametrize("fractions, why", [([0.0, 1.0], "in \\(0, 1\\]"), ([1.5], "in \\(0, 1\\]"),
                                            ([0.5, 0.5], "distinct"), ([0.001, 1.0], "less than one batch")])
def test_bad_data_fractions_are_refused_before_training(tmp_path, fractions, why):
    learnable_cache(tmp_path / "c")
    with pytest.raises(UserError, match=f"--data-fraction: .*{why}"):
        run_ablate(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "abl"), batch_tokens=256),
                   AblateConfig(heads=[1], tree_budget=[4], verify_cost=0.01, data_fraction=fractions))
    assert not (tmp_path / "abl").exists()


def test_recipes_are_named_files_of_train_options_each_trained_and_written_down(tmp_path):
    """--recipe: one run per recipe, its options as in the file (the recipe's lr unless --lr is given), the report
    lists every recipe's options; a recipe that sets what the ablation sets, or an unknown name, is refused."""
    from medusa_cache.recipes import load_recipe

    assert load_recipe("medusa1") == {"lr": 0.001, "schedule": "cosine", "warmup_ratio": 0.015,
                                      "init_from_lm_head": "MODEL", "head_loss_weights": [0.8]}
    assert load_recipe("reference")["schedule"] == "constant" and load_recipe("distill")["distill"] == "MODEL"
    learnable_cache(tmp_path / "c")
    mine = tmp_path / "fast.json"
    mine.write_text(json.dumps({"lr": 0.02, "schedule": "linear", "head_loss_weights": [0.5]}))
    res = run_ablate(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "abl"), epochs=1, batch_tokens=256,
                                 grad_accum=1, val_fraction=0.2),
                     AblateConfig(heads=[1, 2], tree_budget=[4], verify_cost=0.01, recipe=["reference", str(mine)]))
    by = {r["recipe"]: r for r in res["results"] if r["num_heads"] == 2}
    assert set(by) == {"reference", "fast"} and by["reference"]["lr"] == 1e-4 and by["fast"]["lr"] == 0.02
    cfg = json.loads((tmp_path / "abl" / "runs" / "Rfast" / "train_config.json").read_text())
    assert (cfg["schedule"], cfg["head_loss_weights"], cfg["lr"]) == ("linear", [0.5], 0.02)
    report = (tmp_path / "abl" / "report.md").read_text()
    assert "| fast | " in report and "| reference | " in report and "constant" in report and "linear" in report
    for bad, why in (({"num_heads": 3}, "not part of a recipe"), ({"lr": "fast"}, "key 'lr' must be")):
        mine.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=f"--recipe: .*fast.json.*{why}"):
            load_recipe(str(mine))
    with pytest.raises(UserError, match="no recipe named 'nope' \\(known: distill, medusa1, reference"):
        load_recipe("nope")
