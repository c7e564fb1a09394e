#!/usr/bin/env bash
# The vLLM step of the GPU check (generation.engine: vllm; vllm_engine.py), run by profiling/gpu_check.sh as its
# part `vllm`; runnable alone from the repository root: bash profiling/gpu_check_vllm.sh
# Needs a CUDA GPU and `pip install -e ".[vllm]"`; without vLLM it says so and stops (exit 0: nothing to check).
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import vllm" 2>/dev/null; then
  echo "gpu_check_vllm: SKIPPED, vllm is not installed (pip install -e '.[vllm]')"
  exit 0
fi
# Under the GPU check's own work directory, never under the device tool's $OUT (only 8 files come back from there).
WORK="${GPU_CHECK_WORK:-/tmp/frugal_spin_gpu_check}/vllm"
mkdir -p "$WORK"
# 1. The engine alone on the built-in base with a fresh LoRA adapter: our prompt ids in, token ids out, one seed per
#    prompt (the same answers twice), the memory freed afterwards.
python3 - "$WORK" <<'PY'
import sys, time
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from frugal_spin.tiny_base import ensure_tiny_base
from frugal_spin.vllm_engine import VllmOpponent, generate_with_vllm

out = Path(sys.argv[1])
base = ensure_tiny_base(out / "base")
tok = AutoTokenizer.from_pretrained(base)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
model.save_pretrained(out / "adapter")
prompts = [tok.apply_chat_template([{"role": "user", "content": f"{i} + {i * 3}"}], add_generation_prompt=True,
                                   return_dict=False) for i in range(64)]
make = lambda: VllmOpponent(str(base), lora_rank=16, load_in_4bit=False, dtype=torch.float16, max_model_len=256,
                            gpu_memory_utilization=0.3, seed=0)
kw = dict(max_new_tokens=32, temperature=1.0, top_p=1.0, top_k=0, seed=7, eos_id=tok.eos_token_id)
t = time.time()
first = generate_with_vllm(make, prompts, str(out / "adapter"), **kw)
wall = time.time() - t
again = generate_with_vllm(make, prompts, str(out / "adapter"), **kw)
assert first == again, "the same seeds gave other answers"
assert all(0 < len(a) <= 32 for a in first)
print(f"gpu_check_vllm engine: OK, {sum(map(len, first))} tokens for {len(prompts)} prompts in {wall:.1f} s "
      f"(engine start included); GPU memory still allocated after close: "
      f"{torch.cuda.memory_allocated() / 2**20:.0f} MiB")
PY
# 2. The whole method with vLLM sampling (needs bitsandbytes for the 4-bit base and the paged optimizer).
if python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 -m frugal_spin recipes/cpu_tiny.yaml output_dir="$WORK/run" model.device=cuda generation.engine=vllm \
    generation.vllm_gpu_memory_utilization=0.3 data.fraction=0.05 data.eval_size=16 spin.iterations=1 sft.epochs=1
  echo "gpu_check_vllm pipeline: OK ($WORK/run/report.md)"
else
  echo "gpu_check_vllm pipeline: SKIPPED, bitsandbytes is not installed"
fi
