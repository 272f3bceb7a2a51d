"""Everything that touches the base model's files: tokenizer, the decoder pass, batch planning, lm_head rows.

- ``load_tokenizer``: the tokenizer, with our own truncation (``--max-length``).
- ``plan_batches`` / ``ModelPass``: length-bucketed padded batches through the decoder alone
  (``model.base_model``: its ``last_hidden_state`` is after the final norm; no logits are computed), and the
  outputs of Eagle3's auxiliary layers when asked (``aux_layers``, ``resolve_aux_layers``).
- ``read_lm_head``: the base model's lm_head rows, lazily, without loading the model: only one tensor is opened
  (``lm_head.weight``, or ``model.embed_tokens.weight`` when embeddings are tied), through
  ``model.safetensors.index.json`` for sharded checkpoints; the model must be the one the cache was dumped with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import store
from .errors import UserError
from .fingerprint import model_fingerprint


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--tokenizer: cannot load a tokenizer from {path}: {e}") from None
    tok.model_max_length = 1 << 62  # we truncate ourselves (--max-length); silences the length warning
    return tok


PAD_TOLERANCE = 0.06


def plan_batches(offsets: np.ndarray, a: int, b: int, batch_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Batches for unit rows [a, b): each piece is (seq_start, run_end, keep_from) in token coordinates.

    The piece runs the model over [seq_start, run_end) and keeps rows [keep_from, run_end).
    """
    first = int(np.searchsorted(offsets, a, side="right")) - 1
    last = int(np.searchsorted(offsets, b, side="left"))
    pieces = []
    for s in range(first, last):
        s0, s1 = int(offsets[s]), int(offsets[s + 1])
        run_end = min(s1, b)
        if run_end <= max(s0, a):
            continue
        pieces.append((s0, run_end, max(s0, a)))
    pieces.sort(key=lambda p: (-(p[1] - p[0]), p[0]))  # longest first, ties by position: deterministic
    batches, cur, cur_max = [], [], 0
    for p in pieces:
        n = p[1] - p[0]
        # a new batch when the padded size would pass batch_tokens, or when this piece is > 6% shorter
        # than the batch's longest (bounds the pad tokens computed to ~3% on average)
        if cur and (max(cur_max, n) * (len(cur) + 1) > batch_tokens or n < (1 - PAD_TOLERANCE) * cur_max):
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(p)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    return batches


class ModelPass:
    """The decoder of a causal LM, returning post-final-norm hidden states for packed pieces; with ``aux_layers``,
    each piece's rows are followed (along the columns) by the outputs of those decoder layers, before any norm: what
    Eagle3 captures (SpecForge's layer ids, 0-based; each read by a forward hook on ``layers[l]``)."""

    def __init__(self, model_dir: str, dtype: str, device: str, aux_layers: tuple[int, ...] = ()):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=store.TORCH_DTYPES[dtype])
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--model: cannot load {model_dir}: {e}") from None
        self.decoder = model.base_model.to(device).eval()
        self.device = device
        self.computed_tokens = 0
        self.aux_layers, self._seen = tuple(aux_layers), {}
        for layer in sorted(set(self.aux_layers)):
            self.decoder.layers[layer].register_forward_hook(self._capture(layer))

    def _capture(self, layer: int):
        def hook(_module, _args, out):
            self._seen[layer] = out[0] if isinstance(out, tuple) else out
        return hook

    @torch.inference_mode()
    def run(self, ids: np.ndarray, batch: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        width = max(p[1] - p[0] for p in batch)
        x = np.zeros((len(batch), width), dtype=np.int64)
        att = np.zeros((len(batch), width), dtype=np.int64)
        for i, (s0, e, _) in enumerate(batch):
            x[i, : e - s0] = ids[s0:e]
            att[i, : e - s0] = 1
        self.computed_tokens += x.size
        out = self.decoder(
            input_ids=torch.from_numpy(x).to(self.device), attention_mask=torch.from_numpy(att).to(self.device)
        ).last_hidden_state
        if self.aux_layers:
            out = torch.cat([out, *(self._seen[layer] for layer in self.aux_layers)], dim=-1)
            self._seen.clear()
        return [out[i, keep - s0 : e - s0].cpu() for i, (s0, e, keep) in enumerate(batch)]


AUX_PRESETS = ("eagle3", "speculators")


def resolve_aux_layers(spec: str | None, num_layers: int) -> tuple[int, ...]:
    """``--aux-layers``: eagle3 = SpecForge's default capture (decoder layers 1, N/2-1, N-4, 0-based, as its
    ``resolve_eagle_capture_layers``); speculators = those and the last layer N-1 (whose output, before the final
    norm, is speculators' fourth slot); or a comma-separated list of layer ids. None: no auxiliary layers."""
    if not spec:
        return ()
    n = num_layers
    if spec in AUX_PRESETS:
        layers = [1, n // 2 - 1, n - 4] + ([n - 1] if spec == "speculators" else [])
    else:
        try:
            layers = [int(x) for x in spec.split(",")]
        except ValueError:
            raise UserError(f"--aux-layers: {spec!r} is not eagle3, speculators or a comma-separated list of layer "
                            "ids (e.g. 1,15,28)") from None
    if any(not 0 <= x < n for x in layers):  # repeats are allowed, as in SpecForge (eagle3 on 5 layers: 1, 1, 1)
        raise UserError(f"--aux-layers {spec}: layers {layers} must be decoder layers 0..{n - 1} of this {n}-layer "
                        "model" + (" (the presets need at least 4 layers; give ids)" if spec in AUX_PRESETS else ""))
    return tuple(layers)


def final_norm(model_dir: str) -> torch.nn.Module:
    """The model's own final norm module (its class from the model's code, built on the meta device from the config,
    so nothing else of the model is allocated), with its weights read from the checkpoint alone."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise UserError(f"--model: {model_dir}: its decoder has no final `norm` module ({type(model).__name__})")
    prefix = next(n for n, m in model.named_modules() if m is norm)
    files = _weight_files(Path(model_dir))
    state = {}
    for name, _ in norm.named_parameters():
        key = f"{prefix}.{name}"
        if key not in files:
            raise UserError(f"--model: {model_dir} has no {key} in its checkpoint")
        with safe_open(str(files[key]), "pt") as h:
            state[name] = h.get_tensor(key)
    norm = norm.to_empty(device="cpu")
    norm.load_state_dict(state)
    return norm.eval()


LM_KEYS = ("lm_head.weight",)
EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")


def _weight_files(d: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no safetensors weights (only safetensors checkpoints can be read lazily)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def read_lm_head(model_dir: str, rows: np.ndarray | None = None, expect_fingerprint: str | None = None,
                 flag: str = "--init-from-lm-head") -> torch.Tensor:
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise UserError(f"{flag}: {d} is not a model directory (no config.json)")
    if expect_fingerprint is not None and model_fingerprint(d) != expect_fingerprint:
        raise UserError(f"{flag}: {d} is not the model the cache was dumped with (fingerprint differs)")
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    files = _weight_files(d)
    tied = cfg.get("tie_word_embeddings", False)
    keys = (EMBED_KEYS if tied else LM_KEYS) + (LM_KEYS if tied else EMBED_KEYS)
    name = next((k for k in keys if k in files), None)
    if name is None:
        raise UserError(f"{flag}: {d} has neither lm_head.weight nor embed_tokens.weight")
    from safetensors import safe_open

    with safe_open(str(files[name]), "pt") as h:
        w = h.get_tensor(name)
    if rows is not None:
        w = w[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    return w


def stop_ids(tok, model) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (an int or a list), as greedy decoding
    stops on them (speculate and generate alike)."""
    ids = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update([src] if isinstance(src, int) else (src or []))
    return ids


def timed_verify_cost(model: str | None, device: str, nodes: int, context: int = 256, repeats: int = 5
                      ) -> tuple[float, str]:
    """(cost per tree node relative to a one-token step, where it came from), timed on this device: forwards of
    1 and of ``nodes`` tokens over a KV cache of ``context`` tokens, median of ``repeats`` each. A constant would
    be a guess (0.005 suits a memory-bound GPU; on a CPU a node costs ~0.1); a model that is not at hand gives
    an error naming the ways to supply the cost."""
    import time

    from transformers import AutoModelForCausalLM, DynamicCache

    if not model or not Path(model, "config.json").exists():
        raise UserError(f"ablate: the expected speedup needs the verification cost of the model ({model!r} is not a "
                        "model directory here): pass --verify-cost C (per tree node, relative to a one-token step) "
                        "or --speculate-prompts FILE to measure it by real decoding")
    m = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, m.config.vocab_size, (1, context), generator=g).to(device)

    def step(n: int) -> float:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            with torch.inference_mode():
                kv = DynamicCache()
                m(ctx, cache=kv, use_cache=True)
                x = torch.randint(0, m.config.vocab_size, (1, n), generator=g).to(device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x, cache=kv, use_cache=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    t1, tn = step(1), step(nodes)
    cost = max(0.0, (tn / t1 - 1) / nodes)
    return cost, (f"timed on this device ({device}): a 1-token step {t1 * 1e3:.2f} ms, a {nodes}-token step "
                  f"{tn * 1e3:.2f} ms over a {context}-token KV cache")


def model_parameters(model: str | None) -> int | None:
    """Parameters of the model directory's safetensors files (their headers only), or None when it is not here."""
    if not model or not Path(model).is_dir():
        return None
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total or None
