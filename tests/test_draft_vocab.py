"""One dump, any draft vocabulary: `train --draft-vocab-size N` re-maps a cache at train time and gives the heads a
dump at N would have given, bit for bit; `ablate --draft-vocab` sweeps sizes x head counts from one cache;
`inspect` and the ablate report show each size's coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import sharegpt_slice, write_jsonl
from safetensors.torch import load_file

from medusa_cache.ablate import AblateConfig, run_ablate
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.evaluate import EvalConfig, run_eval
from medusa_cache.export import export
from medusa_cache.headsdir import load_heads
from medusa_cache.info import inspect_store
from medusa_cache.store import Cache
from medusa_cache.train import TrainConfig, train

STEPS = dict(num_heads=3, epochs=1, lr=1e-2, batch_tokens=512, grad_accum=1, val_fraction=0.2, seed=3)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, tiny_llama):
    """The same 40 conversations dumped at draft sizes 40 (the cache re-mapped) and 20, 2000 (the references)."""
    d = tmp_path_factory.mktemp("vocab")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(40))
    for n in (40, 20, 2000):
        run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(d / f"c{n}"), draft_vocab_size=n,
                            dtype="float32", max_length=256))
    return d


def _heads(d):
    return load_file(str(d / "medusa_lm_head.safetensors")), load_file(str(d / "vocab_mapping.safetensors"))


@pytest.mark.parametrize("n", [20, 2000])
def test_train_at_another_draft_size_equals_training_on_a_dump_at_that_size(tmp_path, dumps, n):
    """2000 is more than the distinct assistant tokens: never-seen ids fill it, lowest first, as the dump does."""
    distinct = int((Cache(dumps / "c40").array("token_counts") > 0).sum())
    assert (n > distinct) == (n == 2000) and 40 < distinct
    res = train(TrainConfig(cache=str(dumps / "c40"), out=str(tmp_path / "remapped"), draft_vocab_size=n, **STEPS))
    train(TrainConfig(cache=str(dumps / f"c{n}"), out=str(tmp_path / "direct"), **STEPS))
    (a, ma), (b, mb) = _heads(tmp_path / "remapped"), _heads(tmp_path / "direct")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ma[k], mb[k]) for k in ("d2t", "t2d"))
    assert res["vocab"]["remapped_from"] == 40 and res["vocab"]["draft_vocab_size"] == n
    cfg = json.loads((tmp_path / "remapped" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == n and cfg["provenance"]["train"]["draft_vocab_size"] == n
    # eval scores the re-mapped heads against their own vocabulary: as on the dump at n
    e1 = run_eval(EvalConfig(str(tmp_path / "remapped"), str(dumps / "c40"), topk=5))
    e2 = run_eval(EvalConfig(str(tmp_path / "remapped"), str(dumps / f"c{n}"), topk=5))
    assert e1["top1"] == e2["top1"] and e1["chain_acceptance"] == e2["chain_acceptance"]
    # export carries the mapping it trained with (vLLM's token_map)
    export(tmp_path / "remapped", "vllm", tmp_path / "v")
    tm = load_file(str(tmp_path / "v" / "model.safetensors"))["token_map"]
    assert torch.equal(tm, torch.from_numpy(Cache(dumps / f"c{n}").mapping().draft_to_target).to(tm.dtype))


def test_the_cache_own_size_changes_nothing(tmp_path, dumps):
    train(TrainConfig(cache=str(dumps / "c40"), out=str(tmp_path / "a"), draft_vocab_size=40, **STEPS))
    train(TrainConfig(cache=str(dumps / "c40"), out=str(tmp_path / "b"), **STEPS))
    (a, _), (b, _) = _heads(tmp_path / "a"), _heads(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ablate_sweeps_draft_vocabulary_sizes_from_one_cache(tmp_path, dumps):
    cfg = TrainConfig(cache=str(dumps / "c40"), out=str(tmp_path / "abl"), epochs=1, lr=1e-2, batch_tokens=512,
                      grad_accum=1, val_fraction=0.2, seed=3)
    res = run_ablate(cfg, AblateConfig(heads=[1, 2], layers=[1], lr=[1e-2], tree_budget=[4], draft_vocab=[10, 20, 40]))
    rows = res["results"]
    assert sorted({(r["draft_vocab_size"], r["num_heads"]) for r in rows}) == \
        [(n, k) for n in (10, 20, 40) for k in (1, 2)]
    cov = {r["draft_vocab_size"]: r["coverage"] for r in rows}
    assert cov[10]["cache"] < cov[20]["cache"] < cov[40]["cache"] <= 1
    c = Cache(dumps / "c40")
    counts = np.sort(c.array("token_counts"))[::-1]
    assert cov[20]["cache"] == round(counts[:20].sum() / counts.sum(), 4)
    report = (tmp_path / "abl" / "report.md").read_text()
    assert "| draft vocabulary | coverage (cache) | coverage (held out)" in report and "| 10 |" in report
    assert (tmp_path / "abl" / "vocab.png").exists()
    # within one vocabulary the head counts are still prefixes of one run: equal to a separate 20-word run
    train(TrainConfig(cache=str(dumps / "c20"), out=str(tmp_path / "one"), num_heads=2, clip_per_head=True,
                      epochs=1, lr=1e-2, batch_tokens=512, grad_accum=1, val_fraction=0.2, seed=3))
    a = load_file(str(tmp_path / "abl" / "runs" / "V20" / "variants" / "V20_L1_lr0.01" /
                      "medusa_lm_head.safetensors"))
    b = load_file(str(tmp_path / "one" / "medusa_lm_head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    best = json.loads((tmp_path / "abl" / "best" / "config.json").read_text())
    _, mapping, _ = load_heads(tmp_path / "abl" / "best")
    assert best["draft_vocab_size"] == mapping.draft_size == int(res["best"]["variant"].split("_")[0][1:])
    assert all(r["head_cost"] > 0 for r in rows)  # the model is at hand: each head's output layer is counted


def test_inspect_shows_coverage_for_a_list_of_sizes(dumps):
    info = inspect_store(str(dumps / "c40"), [10, 20, 40, 10**9])
    cov = info["draft_vocab_coverage"]
    assert list(cov) == ["10", "20", "40", "128256"] and cov["128256"] == 1.0
    assert cov["10"] < cov["20"] < cov["40"]
