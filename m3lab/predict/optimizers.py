"""The optimizers a traced step builds: HF Trainer's ``--optim`` choices, and the stand-in for
DeepSpeed's FusedAdam CUDA kernel (how its memory behaves, without CUDA).
"""

from __future__ import annotations

import functools

import torch

from m3lab import compat
from m3lab.config import (
    OPTIMIZERS,  # HF Trainer --optim values, each traced by make_optimizer
)


def fused_adam_in_place(chunk_size, noop_flag, tensor_lists, lr, beta1, beta2, eps, step, adam_w_mode,
                        bias_correction, weight_decay):
    """What DeepSpeed's ``multi_tensor_adam`` CUDA kernel does to memory: nothing but update the
    parameters and both moments in place. The kernel (csrc/adam/multi_tensor_adam.cu) loads a chunk
    of each tensor into registers, applies Adam there and writes p, m and v back; it allocates no
    per-tensor temporaries, unlike torch's foreach AdamW (``_foreach_sqrt`` & co. make whole copies).
    Without CUDA the same effect is had with in-place ops, which fake tensors answer without new
    storages; the values are meaningless and never read. torch's own fused AdamW (``fused=True``,
    one kernel per step) has the same memory but for one step-count tensor per parameter, which the
    tests use as the check (tests/test_fused_adam.py)."""
    grads, params, exp_avgs, exp_avg_sqs = tensor_lists
    for grad, param, exp_avg, exp_avg_sq in zip(grads, params, exp_avgs, exp_avg_sqs):
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.addcdiv_(exp_avg, exp_avg_sq, value=-lr)


@functools.cache
def bnb_quantization_maps() -> dict:
    """bitsandbytes' 8-bit quantization maps, built from real numbers (``.tolist()``), which fake
    tensors do not have; built once outside the trace and handed to the optimizer inside it."""
    import bitsandbytes.functional as bnb_functional

    return {signed: bnb_functional.create_dynamic_map(signed=signed) for signed in (True, False)}


def _bnb_adamw_8bit(params, model):
    """What HF Trainer builds for ``--optim adamw_bnb_8bit``: bitsandbytes' AdamW with optim_bits=8,
    and, as Trainer.create_optimizer does, 32-bit states for every nn.Embedding's weight (for BGE-M3
    the 256M-parameter word embeddings: 1.9 GiB of states instead of 0.5). Its update is one fused
    kernel per parameter, so the trace sees only its states: two uint8 moments, a shared 256-entry
    map each and one fp32 absmax per block of 256 values (fp32 moments under 4,096 values)."""
    from bitsandbytes.optim import AdamW, GlobalOptimManager

    maps = bnb_quantization_maps()
    with compat.prebuilt_quantization_maps(maps):
        optimizer = AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=8,
                          is_paged=False)
    manager = GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def make_optimizer(name: str, params, model):
    """The optimizer HF Trainer builds for ``--optim NAME`` (lr does not affect memory)."""
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=1e-5)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-5, scale_parameter=False, relative_step=False)
    if name == "adamw_bnb_8bit":
        return _bnb_adamw_8bit(params, model)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")

