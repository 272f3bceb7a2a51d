"""Held-out prompts scored as decoding scores them: eval's tokens per step from the cache equals speculate's measured
figure on the same prompts, and Spec-Bench / MT-Bench question files run through both, per category."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl

from medusa_cache.acceptance import walks
from medusa_cache.data import read_rows
from medusa_cache.errors import UserError
from medusa_cache.evaluate import evaluate_ranks

# Spec-Bench's / MT-Bench's question format (question_id, category, turns); the questions are this file's own
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short note about the sea.",
                                                         "Now rewrite it as a poem."]},
    {"question_id": 82, "category": "writing", "turns": ["Describe a red door."]},
    {"question_id": 111, "category": "math", "turns": ["What is two plus two?"]},
]


def test_question_rows_keep_their_turns_category_and_id(tmp_path):
    rows = list(read_rows(write_jsonl(tmp_path / "q.jsonl", QUESTIONS), 0))
    assert [r.turns for r in rows] == [q["turns"] for q in QUESTIONS]
    assert [(r.category, r.question_id) for r in rows] == [("writing", 81), ("writing", 82), ("math", 111)]
    bad = list(read_rows(write_jsonl(tmp_path / "b.jsonl", [{"question_id": 1, "turns": []}]), 0))
    assert "'turns' must be a non-empty list" in str(bad[0])


def test_dump_refuses_unanswered_questions_by_line(tmp_path, tiny_llama):
    from medusa_cache.dump import DumpConfig, run_dump

    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    with pytest.raises(UserError, match=r"q.jsonl:1: a question .* holds no answers"):
        run_dump(DumpConfig(model=str(tiny_llama), data=[str(q)], out=str(tmp_path / "c")))


def test_the_walk_counts_one_prefill_per_turn_and_steps_of_one_plus_accepted():
    # two sequences; the first has two assistant turns (runs 0, 1), the second one (run 2)
    rank = np.array([[0, 0], [0, -1], [-1, 0], [1, 0],   # run 0: 4 answer tokens
                     [0, 0], [0, 0], [0, 0],              # run 1: 3 answer tokens
                     [-1, -1], [-1, -1]], dtype=np.int16)  # run 2: 2 answer tokens, nothing accepted
    run = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    seq = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1])
    tokens, steps = walks(rank, run, [(0,), (0, 0)])
    # run 0: prefill (1 token), row 0 accepts 2 (3 tokens) -> row 3 would but 4 tokens are reached: 2 steps... walked
    # by hand: tokens 1 -> 4 (row 0: 1 + 2) -> done (cap 4): steps 2
    assert tokens.tolist() == [4, 3, 2] and steps.tolist() == [2, 2, 2]
    r = {"rank": rank, "has_target": rank >= -1, "seq": seq, "run": run}
    res = evaluate_ranks(r, 2, 10, [], categories={0: "a", 1: "b"})
    assert res["chain_tokens_per_step"] == pytest.approx(9 / 6)
    assert res["categories"]["a"] == {"tokens_per_step": pytest.approx(7 / 4), "tokens_per_step_ci": [1.75, 1.75],
                                      "prompts": 1, "turns": 2}
    assert res["categories"]["b"]["tokens_per_step"] == 1.0


@pytest.mark.slow
def test_a_question_file_through_eval_and_speculate_gives_equal_tokens_per_step_per_category(tmp_path, tiny_chatml):
    """Two categories, a two-turn question: each turn prefilled after the model's own previous answer. Heads trained
    on the model's answers (so they are accepted); eval's figure from the cache equals speculate's, per category and
    turn by turn."""
    from medusa_cache.evaluate import EvalConfig, run_eval
    from medusa_cache.heldout import answer_cache
    from medusa_cache.speculate import SpeculateConfig, run_speculate
    from medusa_cache.train import TrainConfig, train

    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    held = answer_cache(str(tiny_chatml), str(q), tmp_path / "answers", None, 24)
    assert held.turns == 4 and held.prompts == 3
    train(TrainConfig(cache=held.cache, out=str(tmp_path / "h"), num_heads=2, epochs=30, lr=1e-2, batch_tokens=256,
                      grad_accum=1, val_fraction=0, warmup_ratio=0, draft_vocab_size=256))
    tree = [[0], [1], [0, 0], [0, 1], [1, 0]]
    (tmp_path / "tree.json").write_text(json.dumps(tree))
    ev = run_eval(EvalConfig(heads=str(tmp_path / "h"), model=str(tiny_chatml), heldout_prompts=str(q),
                             out=str(tmp_path / "ev"), tree=str(tmp_path / "tree.json"), max_new_tokens=24))
    sp = run_speculate(SpeculateConfig(model=str(tiny_chatml), heads=str(tmp_path / "h"), prompts=str(q),
                                       tree=str(tmp_path / "tree.json"), max_new_tokens=24))
    assert sp["identical_to_greedy"], sp["mismatches"]
    assert sp["turns"] == 4 and [(p["prompt"], p["turn"]) for p in sp["per_prompt"]] == [(0, 0), (0, 1), (1, 0),
                                                                                         (2, 0)]
    assert sp["tokens_per_step"] > 1.2  # heads trained on these answers are accepted: the equality means something
    assert ev["tree_tokens_per_step"] == pytest.approx(sp["tokens_per_step"], abs=1e-4)
    assert list(ev["categories"]) == list(sp["categories"]) == ["writing", "math"]
    for c in ("writing", "math"):
        assert ev["categories"][c]["tokens_per_step"] == pytest.approx(sp["categories"][c]["tokens_per_step"],
                                                                       abs=1e-4)
        assert (ev["categories"][c]["prompts"], ev["categories"][c]["turns"]) == \
               (sp["categories"][c]["prompts"], sp["categories"][c]["turns"])
    assert ev["categories"]["writing"]["turns"] == 3
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["tree_tokens_per_step"] == \
        ev["tree_tokens_per_step"]


def test_every_assistant_turn_of_a_cached_conversation_is_its_own_decoding_run(dumped):
    """A run starts at the last prompt token of each assistant turn and holds one row per answer token, so the walk
    prefills each turn once and never steps across the user turn between two answers."""
    from medusa_cache.evaluate import head_ranks
    from medusa_cache.heads import MedusaHeads
    from medusa_cache.store import Cache

    c = Cache(str(dumped))
    mask, off = c.array("loss_mask").astype(bool), c.offsets
    seqs = c.usable_seqs()
    r = head_ranks(MedusaHeads(c.hidden_size, c.meta.draft_vocab_size, 2, 1, seed=0), c, seqs)
    turns = []  # answer lengths, turn by turn, straight from the mask
    for s in seqs:
        m = mask[off[s]:off[s + 1]].astype(np.int8)
        starts = np.flatnonzero(np.diff(np.r_[0, m]) == 1)
        ends = np.flatnonzero(np.diff(np.r_[m, 0]) == -1) + 1
        turns += (ends - starts).tolist()
    assert np.bincount(r["run"]).tolist() == turns
    assert len(turns) > len(seqs)  # the data has conversations of several assistant turns


def test_generate_answers_every_turn_of_a_question_after_its_own_previous_answer(tmp_path, tiny_chatml):
    """generate reads question files: one messages row per question, user turns as given, each assistant turn the
    model's answer to the conversation up to it (the same answers eval --heldout-prompts caches), id and category
    kept."""
    from transformers import AutoTokenizer

    from medusa_cache.generate import GenerateConfig, generate
    from medusa_cache.heldout import answer_cache

    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    generate(GenerateConfig(model=str(tiny_chatml), prompts=str(q), out=str(tmp_path / "g.jsonl"), max_new_tokens=12))
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["category"]) for r in rows] == [(81, "writing"), (82, "writing"), (111, "math")]
    assert [[m["role"] for m in r["messages"]] for r in rows] == [["user", "assistant"] * 2, ["user", "assistant"],
                                                                  ["user", "assistant"]]
    assert [m["content"] for m in rows[0]["messages"][::2]] == QUESTIONS[0]["turns"]
    tok = AutoTokenizer.from_pretrained(tiny_chatml)
    held = answer_cache(str(tiny_chatml), str(q), tmp_path / "a", None, 12)
    answers = [json.loads(x) for x in (tmp_path / "a" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == held.turns == 4
    for a, m in zip(answers, [rows[0]["messages"][1], rows[0]["messages"][3], rows[1]["messages"][1],
                              rows[2]["messages"][1]], strict=True):
        ids = [t for t, k in zip(a["input_ids"], a["trained"], strict=True) if k]
        assert tok.decode(ids, skip_special_tokens=True).strip() == m["content"].strip()
