"""``medusa-cache speculate``: real Medusa-1 decoding with trained heads, checked against greedy decoding.

One decoding step (greedy verification, batch size 1):
1. The pending token ``x0`` (the base model's own greedy choice, not yet in the KV cache) is the tree's root.
   The heads read the hidden state that produced ``x0``; head i's top-k tokens fill depth i+1 of the tree
   (``--tree``: a ``medusa_choices`` list of top-k index paths, as ``eval --trees-out`` writes; ``--chain``:
   top-1 of every head, what vLLM's Medusa proposer does).
2. The plain Hugging Face model scores root + nodes in **one** forward over its KV cache, with a 4-D attention
   mask (each node sees the cached prefix, its ancestors and itself) and position ids = prefix length + depth.
3. From the root, follow the child whose token equals the base model's greedy choice at its parent, as deep as
   it goes; those tokens are accepted, and the greedy choice at the last accepted node becomes the next ``x0``.
4. The KV cache keeps exactly the prefix plus root and accepted nodes (the rows of the other nodes are dropped).

So every emitted token is the base model's greedy choice given the tokens before it: the output equals greedy
decoding, up to kernel rounding at numerical near-ties (a tree forward batches positions that greedy decoding
computes one by one). ``run_speculate`` checks it against ``model.generate`` on every prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from .backbone import stop_ids
from .config import check, check_common
from .errors import UserError
from .heldout import greedy, read_prompts, walk_turns
from .progress import Progress


@dataclass
class SpeculateConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ('model', 'heads', 'prompts')  # shown and enforced as required by the CLI

    model: str | None = None
    """Local base-model directory (the model the heads were trained for)."""
    heads: str | None = None
    """Heads directory written by `medusa-cache train` (or ablate's best/)."""
    prompts: str | None = None
    """JSON/JSONL prompts: {"text": ...} rows are continued; chat rows get the chat template's generation prompt;
    Spec-Bench / MT-Bench question files ({"question_id", "category", "turns"}) are answered turn by turn, with
    figures per category."""
    tree: str | None = None
    """medusa_choices JSON (a list of top-k index paths), e.g. from `eval --trees-out`."""
    chain: bool = False
    """Use the chain (top-1 of every head) instead of a tree."""
    max_new_tokens: int = 256
    """Tokens generated per prompt (fewer when an end-of-sequence token comes first)."""
    max_prompts: int | None = None
    """Use only the first N prompts (questions: every turn of the first N)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model dtype for both greedy and Medusa decoding."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    threads: int | None = None
    """CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share."""
    out: str | None = None
    """Directory for results.json and report.md (optional)."""
    json: bool = False
    """Print the results as JSON."""
    allow_other_model: bool = False
    """Decode with heads trained on another model's states (refused by default: decoding stays lossless, but the heads
    were not trained for this model, so the tokens per step mean little)."""

    def __post_init__(self) -> None:
        check_common(self)
        check(bool(self.tree) != self.chain, "tree", "give exactly one of --tree FILE or --chain")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be >= 1")


class Tree:
    """Root (index 0) plus the nodes of ``paths`` sorted by depth; parent, depth and ancestor mask per node."""

    def __init__(self, paths: list[tuple[int, ...]]):
        self.paths = [()] + sorted(set(paths), key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(self.paths)}
        self.parent = [-1] + [index[p[:-1]] for p in self.paths[1:]]
        self.depth = torch.tensor([len(p) for p in self.paths])
        n = len(self.paths)
        self.sees = torch.zeros(n, n, dtype=torch.bool)  # node i attends to node j (j is i or an ancestor)
        for i in range(n):
            j = i
            while j >= 0:
                self.sees[i, j] = True
                j = self.parent[j]
        self.children: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            self.children[self.parent[i]].append(i)
        self.topk = max((max(p) for p in self.paths[1:]), default=0) + 1
        self.max_depth = int(self.depth.max())


def _mask(tree: Tree, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    allowed = torch.cat([torch.ones(len(tree.paths), past, dtype=torch.bool), tree.sees], dim=1)
    m = torch.zeros(allowed.shape, dtype=dtype)
    m[~allowed] = torch.finfo(dtype).min
    return m[None, None].to(device)


def _keep_rows(cache, rows: torch.Tensor) -> None:
    """Keep only these sequence positions of every layer's keys and values (the accepted path)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, rows)
        layer.values = layer.values.index_select(-2, rows)


class MedusaDecoder:
    def __init__(self, model, heads, draft_to_target: torch.Tensor, tree: Tree):
        self.model, self.heads, self.tree = model, heads, tree
        self.d2t = draft_to_target.to(model.device)
        self.device = model.device

    def _forward(self, ids: torch.Tensor, cache, position_ids=None, mask=None):
        out = self.model.model(input_ids=ids, cache=cache, position_ids=position_ids, attention_mask=mask,
                               use_cache=True)
        h = out.last_hidden_state  # after the final norm: what the lm_head and the heads read
        return h, self.model.lm_head(h)

    def _propose(self, h: torch.Tensor) -> torch.Tensor:
        """Token ids of the tree nodes below the root, from the heads at hidden state ``h`` [H]."""
        t = self.tree
        logits = self.heads(h[None].float())
        top = [self.d2t[lg[0].topk(min(t.topk, lg.shape[-1])).indices] for lg in logits[: t.max_depth]]
        return torch.stack([top[len(p) - 1][p[-1]] for p in t.paths[1:]]) if len(t.paths) > 1 else \
            torch.zeros(0, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new: int, stop: set[int]) -> tuple[list[int], int]:
        """(new token ids, base-model forwards including the prefill) for one prompt [L]."""
        from transformers import DynamicCache

        cache = DynamicCache()
        h, logits = self._forward(prompt[None], cache)
        x0, h_last = int(logits[0, -1].argmax()), h[0, -1]
        out, steps, t = [x0], 1, self.tree
        while len(out) < max_new and x0 not in stop:
            past = cache.get_seq_length()
            nodes = self._propose(h_last)
            ids = torch.cat([torch.tensor([x0], device=self.device), nodes])[None]
            pos = (past + t.depth).to(self.device)[None]
            h, logits = self._forward(ids, cache, pos, _mask(t, past, logits.dtype, self.device))
            steps += 1
            greedy = logits[0].argmax(-1).tolist()
            tokens = ids[0].tolist()
            path, cur = [0], 0
            while True:
                nxt = next((c for c in t.children[cur] if tokens[c] == greedy[cur]), None)
                if nxt is None:
                    break
                path.append(nxt)
                cur = nxt
            _keep_rows(cache, torch.cat([torch.arange(past), past + torch.tensor(path)]).to(self.device))
            accepted = [tokens[i] for i in path[1:]] + [greedy[cur]]
            for tok in accepted:
                out.append(tok)
                if tok in stop or len(out) >= max_new:
                    break
            x0, h_last = out[-1], h[0, cur]
        return out[:max_new], steps


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_speculate(cfg: SpeculateConfig) -> dict:
    """Decode every prompt greedily and with Medusa (alternated, after a warm-up), compare them token for token,
    and report tokens per step, the step cost and the speedup measured in this run."""
    from transformers import AutoModelForCausalLM

    model_cfg, tok, heads, mapping, paths = check_request(cfg)
    questions = read_prompts(cfg.prompts, cfg.max_prompts)
    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(cfg.device).eval()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model: cannot load {cfg.model}: {e}") from None
    heads = heads.to(cfg.device).eval()
    dec = MedusaDecoder(model, heads, torch.from_numpy(mapping.draft_to_target), Tree(paths))
    stop = stop_ids(tok, model)
    rows, mismatches = [], []
    bar = Progress(len(questions), "speculate", "prompt")

    def answer(t) -> list[int]:
        p = t.ids.to(cfg.device)
        if not rows:  # warm-up, before the first timed prompt
            greedy(model, p, 4, stop)
            dec.generate(p, 4, stop)
        row, mismatch = decode_both(model, dec, p, cfg.max_new_tokens, stop)
        rows.append({"prompt": t.question, "turn": t.turn, "category": t.category, **row})
        if mismatch:
            mismatches.append({"prompt": t.question, "turn": t.turn, **mismatch})
        if t.turn == len(questions[t.question].turns or [None]) - 1:
            bar.update(1)
        return row.pop("answer")

    walk_turns(tok, questions, answer)
    bar.close()
    res = summarise(cfg, len(paths), rows, mismatches)
    if cfg.out:
        out = Path(cfg.out)
        (out / "results.json").write_text(json.dumps(res, indent=2))
        (out / "report.md").write_text(render(res) + "\n")
    bad = [m for m in mismatches if cfg.dtype == "float32" and m["top2_gap"] > 1e-4]
    if bad:
        m = bad[0]
        raise UserError(f"Medusa output differs from greedy decoding at prompt {m['prompt']}, position "
                        f"{m['position']} (top-2 logit gap {m['top2_gap']:.3g}, not a near-tie): this is a bug")
    return res


def check_request(cfg: SpeculateConfig):
    """Everything that can refuse the run, before the model is loaded: (model config, tokenizer, heads, mapping,
    tree paths)."""
    from transformers import AutoConfig, AutoTokenizer

    from .acceptance import chain, load_tree
    from .dist import check_device
    from .fingerprint import model_fingerprint
    from .headsdir import load_heads

    check_device(cfg.device)
    if cfg.out:  # refused before any work: a file, an input, another command's output, a foreign directory
        from .rundir import own_dir

        own_dir(cfg.out, "speculate", {"--heads": cfg.heads, "--model": cfg.model, "--prompts": cfg.prompts})
    heads, mapping, hcfg = load_heads(cfg.heads)
    paths = chain(heads.num_heads) if cfg.chain else load_tree(cfg.tree, heads.num_heads)
    try:
        mc = AutoConfig.from_pretrained(cfg.model)
        tok = AutoTokenizer.from_pretrained(cfg.model)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model: cannot load {cfg.model}: {e}") from None
    if mc.hidden_size != heads.hidden_size or mc.vocab_size != mapping.target_size:
        raise UserError(f"--heads: {cfg.heads} were trained for hidden size {heads.hidden_size} and vocabulary "
                        f"{mapping.target_size}, the model has {mc.hidden_size} and {mc.vocab_size}")
    trained_on = (hcfg.get("cache_fingerprint") or {}).get("model")
    if trained_on and trained_on != "synthetic" and trained_on != model_fingerprint(cfg.model) \
            and not cfg.allow_other_model:
        raise UserError(f"--heads: {cfg.heads} were trained on states of another model than {cfg.model} (model "
                        "fingerprints differ); decoding stays identical to greedy, but its tokens per step would "
                        "say nothing about these heads: pass the model they were trained for, or --allow-other-model")
    return mc, tok, heads, mapping, paths


def decode_both(model, dec: MedusaDecoder, p: torch.Tensor, max_new: int, stop: set[int]) -> tuple[dict, dict | None]:
    """One prompt decoded greedily, then with Medusa, timed; (its row, the first difference or None)."""
    t0 = time.perf_counter()
    ref = greedy(model, p, max_new, stop)
    t1 = time.perf_counter()
    got, steps = dec.generate(p, max_new, stop)
    t2 = time.perf_counter()
    d = first_difference(ref, got)
    mismatch = None
    if d is not None:
        with torch.inference_mode():
            seq = torch.tensor(ref[:d], dtype=torch.long, device=p.device)
            lg = model(torch.cat([p, seq])[None]).logits[0, -1].float()
            mismatch = {"position": d, "top2_gap": float(lg.topk(2).values[0] - lg.topk(2).values[1])}
    return {"tokens": len(got), "steps": steps, "tokens_per_step": len(got) / steps, "greedy_s": t1 - t0,
            "medusa_s": t2 - t1, "identical": d is None, "answer": ref}, mismatch


def summarise(cfg: SpeculateConfig, nodes: int, rows: list[dict], mismatches: list[dict]) -> dict:
    res = {"model": cfg.model, "heads": cfg.heads, "tree": "chain" if cfg.chain else cfg.tree, "nodes": nodes,
           "dtype": cfg.dtype, **totals(rows), "identical_to_greedy": not mismatches, "mismatches": mismatches}
    if any(r["category"] is not None for r in rows):
        res["categories"] = {c: totals([r for r in rows if (r["category"] or "(none)") == c])
                             for c in dict.fromkeys(r["category"] or "(none)" for r in rows)}
    return res | {"per_prompt": rows}


def totals(rows: list[dict]) -> dict:
    """Tokens per step, step cost and speedup over ``rows`` (turns), all measured in this run."""
    tokens, steps = sum(r["tokens"] for r in rows), sum(r["steps"] for r in rows)
    g_s, m_s = sum(r["greedy_s"] for r in rows), sum(r["medusa_s"] for r in rows)
    return {"prompts": len({r["prompt"] for r in rows}), "turns": len(rows), "tokens": tokens, "steps": steps,
            "tokens_per_step": round(tokens / steps, 4), "greedy_s": round(g_s, 3), "medusa_s": round(m_s, 3),
            "speedup": round(g_s / m_s, 3) if m_s else None,
            # one Medusa step (tree forward + heads) over one greedy step (one-token forward), both measured here;
            # speedup = tokens_per_step / step_cost_ratio
            "step_cost_ratio": round((m_s / steps) / (g_s / tokens), 3) if g_s and steps else None}


def render(res: dict) -> str:
    cats = res.get("categories")
    return "\n".join([
        "| tree | nodes | prompts | tokens | steps | tokens/step | step cost / greedy step | greedy s | medusa s "
        "| speedup | identical to greedy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['tree']} | {res['nodes']} | {res['prompts']} | {res['tokens']} | {res['steps']} | "
        f"{res['tokens_per_step']:.3f} | {res['step_cost_ratio']} | {res['greedy_s']:.2f} | {res['medusa_s']:.2f} | "
        f"{res['speedup']} | "
        f"{'yes' if res['identical_to_greedy'] else 'no: ' + str(len(res['mismatches'])) + ' prompts'} |",
    ] + (["", "| category | prompts | turns | tokens | steps | tokens/step | speedup |",
          "|---|---|---|---|---|---|---|"]
         + [f"| {c} | {v['prompts']} | {v['turns']} | {v['tokens']} | {v['steps']} | {v['tokens_per_step']:.3f} | "
            f"{v['speedup']} |" for c, v in cats.items()] if cats else []))

