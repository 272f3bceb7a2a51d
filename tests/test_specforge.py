"""`--pipeline specforge` gives exactly SpecForge's ids and loss masks (golden files from SpecForge's own code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CHAT, FIXTURES

from medusa_cache.data import read_rows
from medusa_cache.specforge_pipeline import SpecForgeTemplater, detect_template

GOLDEN = FIXTURES / "specforge"


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_every_conversation_matches_specforges_ids_and_mask(name, llama_tok, qwen_tok):
    tok = llama_tok if name == "llama3" else qwen_tok
    prov = json.loads((GOLDEN / "provenance.json").read_text())
    g = np.load(GOLDEN / f"{name}.npz")
    templater = SpecForgeTemplater(tok, detect_template(tok, None), prov["max_length"])
    got = []
    for fi, f in enumerate(prov["files"]):
        got += templater.encode_many(list(read_rows(CHAT / f, fi, pipeline="specforge")))
    assert len(got) == len(g["where"]) == 800
    same = 0
    for k, ex in enumerate(got):
        a, b = g["offsets"][k], g["offsets"][k + 1]
        assert (ex.file_index, ex.row_index) == tuple(g["where"][k])
        same += np.array_equal(ex.input_ids, g["ids"][a:b]) and np.array_equal(ex.loss_mask, g["mask"][a:b] == 1)
    assert same == 800, f"{same}/800 conversations identical to SpecForge {prov['specforge_version']}"


def test_default_pipeline_differs_from_specforge_where_documented(llama_tok):
    """Our own pipeline: no inserted system prompt, function_call trained, observations kept untrained."""
    from medusa_cache.templater import Templater

    rows = list(read_rows(CHAT / "fastchat_dummy_sharegpt.json", 0))[:20]
    ours = Templater(llama_tok).encode_many(rows)
    sf = SpecForgeTemplater(llama_tok, detect_template(llama_tok, None), 2048).encode_many(
        list(read_rows(CHAT / "fastchat_dummy_sharegpt.json", 0, pipeline="specforge"))[:20])
    assert all(len(a.input_ids) != len(b.input_ids) for a, b in zip(ours, sf, strict=True))
    text = llama_tok.decode(sf[0].input_ids)
    assert "You are a helpful, respectful and honest assistant" in text and "honest assistant" not in \
        llama_tok.decode(ours[0].input_ids)


def test_dump_with_the_specforge_pipeline_stores_specforges_tokens(tmp_path, tiny_llama):
    from conftest import write_jsonl

    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.errors import UserError
    from medusa_cache.store import Cache
    from medusa_cache.train import TrainConfig, train

    rows = json.loads((CHAT / "glaive_toolcall_sharegpt.json").read_text())[:12]
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(tmp_path / "c"), pipeline="specforge",
                        dtype="float32", draft_vocab_size=500))
    c = Cache(tmp_path / "c")
    assert c.meta.pipeline == "specforge"
    g = np.load(GOLDEN / "llama3.npz")
    ids, mask, src = c.array("input_ids"), c.array("loss_mask").astype(bool), c.array("seq_source")
    for s in range(c.n_seqs):
        k = 500 + int(src[s, 1])  # glaive rows follow the 500 fastchat rows in the golden file
        a, b = c.offsets[s], c.offsets[s + 1]
        assert np.array_equal(ids[a:b], g["ids"][g["offsets"][k]:g["offsets"][k + 1]])
        assert np.array_equal(mask[a:b], g["mask"][g["offsets"][k]:g["offsets"][k + 1]] == 1)
    train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h"), data_pipeline="specforge", max_steps=1))
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"conversations": r["conversations"]} for r in rows])
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(plain)], out=str(tmp_path / "own"), dtype="float32"))
    with pytest.raises(UserError, match="--data-pipeline: the config expects a cache dumped with --pipeline specforge"):
        train(TrainConfig(cache=str(tmp_path / "own"), out=str(tmp_path / "h2"), data_pipeline="specforge"))


def test_generate_with_the_specforge_pipeline_regenerates_the_conversation_specforge_trains(tmp_path):
    """stories260K has no chat template: give it a Llama-3-style one; the regenerated rows carry SpecForge's
    inserted system prompt and only its kept roles, so dump --pipeline specforge trains exactly these turns."""
    import shutil

    from conftest import STORIES, write_jsonl

    from medusa_cache.generate import GenerateConfig, generate

    model = tmp_path / "m"
    shutil.copytree(STORIES, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
                            "+ m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    rows = [{"conversations": [{"from": "system", "value": "ignored by SpecForge"},
                               {"from": "human", "value": "Tell me a story."}, {"from": "gpt", "value": "x"},
                               {"from": "observation", "value": "dropped"}]}]
    generate(GenerateConfig(model=str(model), prompts=str(write_jsonl(tmp_path / "p.jsonl", rows)),
                            out=str(tmp_path / "g.jsonl"), max_new_tokens=8, pipeline="specforge"))
    (out,) = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text().splitlines()]
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert out["messages"][0]["content"].startswith("You are a helpful, respectful and honest assistant")
    assert out["messages"][2]["content"] != "x"
