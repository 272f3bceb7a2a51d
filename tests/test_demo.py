"""The real path on the pretrained stories260K: generate (resumable), dump, train, and heads that learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medusa_cache.demo import DEMO
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.evaluate import head_ranks, topk_accuracy
from medusa_cache.generate import GenerateConfig, generate
from medusa_cache.headsdir import load_heads
from medusa_cache.store import Cache
from medusa_cache.train import TrainConfig, train
from medusa_cache.vocab import IGNORE

MODEL = str(DEMO / "stories260K")


def _prompts(tmp_path, n):
    rows = (DEMO / "prompts.jsonl").read_text().splitlines()[:n]
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_generate_resumes_after_a_torn_write_without_duplicates(tmp_path):
    prompts = _prompts(tmp_path, 6)
    cfg = dict(model=MODEL, prompts=str(prompts), max_new_tokens=8, batch_size=2)
    generate(GenerateConfig(out=str(tmp_path / "ref.jsonl"), **cfg))
    ref = (tmp_path / "ref.jsonl").read_text().splitlines()
    assert len(ref) == 6 and all(json.loads(r)["text"].startswith(json.loads(p)["text"])
                                 for r, p in zip(ref, prompts.read_text().splitlines(), strict=True))
    # what a kill mid-write leaves: two complete rows and a torn third
    (tmp_path / "out.jsonl").write_text("\n".join(ref[:2]) + "\n" + ref[2][:10])
    marker = (tmp_path / "ref.jsonl.medusa-cache.json").read_text()  # generate's own: what --resume requires
    (tmp_path / "out.jsonl.medusa-cache.json").write_text(marker)
    generate(GenerateConfig(out=str(tmp_path / "out.jsonl"), resume=True, **cfg))
    assert (tmp_path / "out.jsonl").read_text().splitlines() == ref


@pytest.mark.slow
def test_self_distilled_heads_beat_the_unigram_baseline_and_head0_beats_the_last(tmp_path):
    generate(GenerateConfig(model=MODEL, prompts=str(_prompts(tmp_path, 60)), out=str(tmp_path / "s.jsonl"),
                            max_new_tokens=120, batch_size=30))
    run_dump(DumpConfig(model=MODEL, data=[str(tmp_path / "s.jsonl")], out=str(tmp_path / "c"), dtype="float32"))
    train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h"), num_heads=5, epochs=15, lr=5e-3,
                      batch_tokens=1024, grad_accum=1, val_fraction=0.15, init_from_lm_head=MODEL))
    c = Cache(tmp_path / "c")
    heads, _, _ = load_heads(tmp_path / "h")
    from medusa_cache.train import split

    train_seqs, val = split(c, TrainConfig(cache="x", out="y", val_fraction=0.15))
    r = head_ranks(heads, c, val)
    top1 = topk_accuracy(r["rank"], r["has_target"], (1,))[1]
    # unigram baseline: always predict the most frequent training label
    labels = c.array("labels")
    train_rows = np.concatenate([np.arange(c.offsets[s], c.offsets[s + 1]) for s in train_seqs])
    lab = labels[train_rows]
    best = np.bincount(lab[lab != IGNORE]).argmax()
    val_rows = np.concatenate([np.arange(c.offsets[s], c.offsets[s + 1]) for s in val])
    vl = labels[val_rows]
    baseline = float((vl == best).sum() / max(1, (c.array("loss_mask")[val_rows] == 1).sum()))
    assert all(t > baseline + 0.02 for t in top1), (top1, baseline)
    assert top1[0] > top1[-1]


def test_generate_leaves_no_seam_and_dump_stores_exactly_the_models_ids(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"text": "Once upon a time, there was a girl named Lily. She had a red ball."}) +
                       "\n" + json.dumps({"text": "The dog ran"}) + "\n")
    generate(GenerateConfig(model=MODEL, prompts=str(prompts), out=str(tmp_path / "g.jsonl"), max_new_tokens=30,
                            batch_size=2))
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    for r, p in zip(rows, ["Once upon a time, there was a girl named Lily. She had a red ball.", "The dog ran"],
                    strict=True):
        assert r["text"].startswith(p + " ") or r["text"].startswith(p + "\n")  # no "ball.She" seam
        assert r["text"] == tok.decode(r["input_ids"], skip_special_tokens=True)
        enc = tok(p, return_tensors="pt")
        ref = model.generate(**enc, do_sample=False, max_new_tokens=30, pad_token_id=tok.eos_token_id)[0].tolist()
        n = sum(r["trained"])
        assert r["input_ids"] == ref[: len(r["input_ids"])] and r["trained"][-n:] == [1] * n and n > 0
    run_dump(DumpConfig(model=MODEL, data=[str(tmp_path / "g.jsonl")], out=str(tmp_path / "c"), dtype="float32",
                        max_length=512))
    c = Cache(tmp_path / "c")
    ids, mask = c.array("input_ids"), c.array("loss_mask").astype(bool)
    for s, r in enumerate(rows):
        a, b = c.offsets[s], c.offsets[s + 1]
        assert ids[a:b].tolist() == r["input_ids"] and mask[a:b].tolist() == [bool(x) for x in r["trained"]]


def test_several_sampled_answers_per_prompt_are_adjacent_marked_and_resume_exactly(tmp_path):
    """--num-answers 3 --temperature 1: three rows per prompt, next to each other, marked with the prompt's group;
    a run killed after its first batch and resumed writes exactly the uninterrupted run's rows (each batch samples
    from (seed, batch)), and the answers to one prompt are held out together by train's split."""
    from conftest import run_fault

    prompts = _prompts(tmp_path, 4)
    cfg = dict(model=MODEL, prompts=str(prompts), max_new_tokens=10, batch_size=4, temperature=1.0, num_answers=3,
               seed=5)
    assert generate(GenerateConfig(out=str(tmp_path / "ref.jsonl"), **cfg)) == 12
    ref = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert [(r["group"], r["answer"]) for r in ref] == [(g, a) for g in range(4) for a in range(3)]
    assert len({tuple(r["input_ids"]) for r in ref[:3]}) > 1  # sampled: the answers to one prompt differ
    args = ["generate", "--model", MODEL, "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
            "--max-new-tokens", "10", "--batch-size", "4", "--temperature", "1", "--num-answers", "3", "--seed", "5"]
    p = run_fault("medusa_cache.generate:_generate_window", 2, "SIGKILL", *args)
    assert p.returncode != 0
    got = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(got) == 4  # the first batch reached disk before the kill
    generate(GenerateConfig(out=str(tmp_path / "out.jsonl"), resume=True, **cfg))
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ref
    run_dump(DumpConfig(model=MODEL, data=[str(tmp_path / "ref.jsonl")], out=str(tmp_path / "c"), dtype="float32",
                        max_length=256))
    from medusa_cache.traindata import split

    train_seqs, val = split(Cache(str(tmp_path / "c")), TrainConfig(cache="x", out="y", val_fraction=0.3))
    held = {ref[s]["group"] for s in val}
    assert val.size and all(ref[s]["group"] not in held for s in train_seqs)
    with pytest.raises(Exception, match="--num-answers: several answers per prompt need sampling"):
        GenerateConfig(out="x", **{**cfg, "temperature": 0.0})


def test_a_prompt_that_would_run_past_the_models_positions_is_refused_by_line(tmp_path):
    """stories260K has 512 positions: a 600-token prompt is refused naming its line, before anything is written."""
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"text": "Once upon a time"}) + "\n" + json.dumps({"text": "the dog ran " * 200}) + "\n")
    with pytest.raises(Exception, match=r"--prompts: .*p.jsonl:2: the prompt has \d+ tokens; with --max-new-tokens "
                                        r"8 the answer would run past the model's 512 positions"):
        generate(GenerateConfig(model=MODEL, prompts=str(p), out=str(tmp_path / "g.jsonl"), max_new_tokens=8))
    assert not (tmp_path / "g.jsonl").exists()
