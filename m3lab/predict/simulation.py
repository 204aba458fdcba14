"""The simulation a trace runs in: a fake process group, DeepSpeed on a CPU accelerator that says
it is a GPU, and the GPU's attention kernel and optimizer paths; every change undone afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from m3lab import compat
from m3lab.gpus import GPU
from m3lab.predict.fake_cache_key import faster_dispatch
from m3lab.predict.optimizers import fused_adam_in_place

# With optimizer offload, the trace's stand-in for the GPU: a CPU device with an index, which fake
# tensors keep apart from plain "cpu" (DeepSpeed's host side) and refuse to mix, as CUDA would.
GPU_DEVICE = "cpu:0"


class _Dropping(logging.Filter):
    """Drops log records that hold ``text`` (noise of the trace, not of the run)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def sdpa_emulation(kernel: str):
    """F.scaled_dot_product_attention as the GPU runs it: the memory-efficient or flash kernel.

    Both keep only the output and a log-sum-exp per row for backward, never the (L x L) scores;
    on a fake CPU tensor PyTorch would pick a CPU kernel instead, so the trace calls the CUDA
    kernels' ATen ops directly (their shape functions run on fake tensors).
    """
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if kernel == "flash" and attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, query.requires_grad or key.requires_grad, dropout_p, is_causal,
            scale=scale)[0]
    return sdpa


@contextlib.contextmanager
def simulation(gpu: GPU | None, kernel: str, rank: int, world: int, model_config, device: str = "cpu"):
    """Fake process group (rank of world), CPU DeepSpeed accelerator, GPU kernels; all undone after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("m3lab.predict needs a process without torch.distributed initialised; "
                           "call it from a notebook or script, not inside a training run.")
    saved_env = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    stack = contextlib.ExitStack()
    try:
        os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29400")
        # DeepSpeed's "GPU" tensors go to ``device``; what it offloads, to "cpu"
        stack.enter_context(compat.deepspeed_accelerator_as_gpu(device))
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        # DeepSpeed's offload (pinned buffers) and bitsandbytes (its CUDA stream) read tensors' data
        # pointers, which fake tensors warn about; no data is read, so the warning is noise here
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        # DeepSpeed 0.19's ZeRO partitioning still calls torch's old all-gather name; nothing to act on
        warnings.filterwarnings("ignore", ".*all_gather_into_tensor. is deprecated", FutureWarning)
        # A JSON's DeepSpeed scheduler is asked for its rate before its first step, and says so
        quiet = _Dropping("Attempting to get learning rate from scheduler before it has started")
        logging.getLogger("DeepSpeed").addFilter(quiet)
        stack.callback(logging.getLogger("DeepSpeed").removeFilter, quiet)
        stack.enter_context(faster_dispatch())
        stack.enter_context(compat.no_shared_memory_comm())
        # DeepSpeed's FusedAdam (a JSON's Adam/AdamW without torch_adam) with its CUDA kernel modelled
        stack.enter_context(compat.fused_adam_kernel(fused_adam_in_place))
        stack.enter_context(compat.cpu_adam_kernel())  # offload without torch_adam: DeepSpeedCPUAdam
        stack.enter_context(compat.no_padding_warning())
        stack.enter_context(compat.full_length_attention_masks(model_config))
        if gpu is not None:
            stack.enter_context(compat.gpu_attention_kernel(sdpa_emulation(kernel)))
            # torch optimizers pick their foreach (multi-tensor) path for CUDA tensors and the
            # single-tensor path on CPU; their temporaries differ, so take the GPU's path, except
            # for what an offloaded optimizer keeps in host memory (plain "cpu" when offloading).
            def gpu_default(params, differentiable, use_fused=False):
                on_host = device != "cpu" and any(
                    isinstance(p, torch.Tensor) and p.device.index is None for p in params)
                return False, not differentiable and not on_host

            stack.enter_context(compat.optimizer_paths(gpu_default))
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        stack.close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def import_lazy_modules(model_config) -> None:
    """Import now what the step imports lazily, so that a fresh process (a worker, the CLI) traces
    what a warm one does: the simulation patches transformers' mask helper only in modeling
    modules already imported, and modules that build constant tensors on import (peft's, via
    FlagEmbedding) would otherwise have them counted once, in the first trace of a process."""
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"  # the trace's accelerator; not left set for training runs
    try:
        import deepspeed  # noqa: F401
        import FlagEmbedding.finetune.embedder.encoder_only.m3.modeling  # noqa: F401
        import peft  # noqa: F401
        from transformers import AutoModel

        AutoModel._model_mapping[type(model_config)]
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = saved


def default_device(device: str):
    """Where tensors created without a device go during the trace. ``torch.device`` as a context
    adds a Python hook to every torch call (a tenth of a trace's time), so it is used only when the
    default is not already ``device``."""
    return contextlib.nullcontext() if torch.get_default_device() == torch.device(device) else torch.device(device)

