"""Optional Triton kernels, each beside the plain torch reference it must match.

- `logprob`: the lm_head log-softmax + target gather of `frugal_spin.logprobs`, with a Triton kernel for the
  logsumexp over vocabulary tiles and the in-place softmax gradient (CUDA; frozen head).
- `nf4_lora`: a LoRA linear over a bitsandbytes NF4 base, y = x dequant(W)^T + s (x A^T) B^T (+ bias), with the
  dequantisation fused into a Triton matmul, forward and backward (d x, d A, d B; the base is frozen).
- `peft_swap`: points peft's 4-bit LoRA layers at the fused linear on CUDA.
- `dispatch`: picks Triton on CUDA tensors when triton imports, the torch reference otherwise.

Nothing here imports triton at module import time: the CPU install has no triton, and every caller must keep
working without it.
"""
