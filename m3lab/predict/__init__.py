"""The memory predictor: the peak GPU memory of one training step, traced on a CPU with fake tensors.

``predict(config, gpu="t4")`` builds the full-size model on fake tensors (shapes and dtypes, no
data, no memory), wraps it in the real DeepSpeed engine over a fake process group (rank r of N),
and runs FlagEmbedding's own M3 forward, backward and optimizer step. Every tensor storage is
recorded as the operators create it and Python frees it, rounded as the CUDA caching allocator
rounds, and labelled (weights, gradients, optimizer states, activations, temporaries, other).
What a GPU does differently from the CPU trace is emulated: its attention kernel (T4: SDPA's
memory-efficient kernel, no flash) and its precision (fp16 weights under DeepSpeed, or fp32
weights under autocast for HF AMP). Inputs are assumed full length (every text reaches its max
length), the worst case, under which transformers drops the attention mask as it does for real.

One file per job: ``allocator`` (the caching allocator), ``trace`` (the dispatch mode that
records storages), ``simulation`` (fake process group, GPU kernels), ``geometry`` (a model's shape,
no download), ``models`` (the model built from it), ``optimizers`` and ``drivers`` (a step as HF Trainer runs it, with or without
DeepSpeed), ``step`` (two traced steps of one rank), ``extrapolate`` (shallow copies to full
depth), ``pool`` (worker processes), ``report`` (figures and verdict), ``spec`` (a TrainConfig as
the trace sees it), ``prediction``, ``steptime`` (a step's time from its counted FLOPs),
``fake_cache_key`` (FakeTensorMode's cache keys for the trace). A pasted training command is read
by ``m3lab.command``.

Known limitations:

- ZeRO stage 3 and parameter offload are not modelled; a DeepSpeed JSON asking for either is
  refused (``m3lab.deepspeed_json``). Optimizer offload (stages 1 and 2) is.
- Inputs are assumed full length: a batch of shorter texts needs less than predicted.
- One CUDA stream: the allocator is simulated for the default stream only, and NCCL's own buffers
  in a two-GPU run (allocated outside PyTorch's allocator) are not traced.
- Step times come from FLOPs and a T4's measured shares of its peak; other cards get those shares
  applied to their datasheet peak (``steptime`` says so), none at all without a datasheet peak.
- The CUDA context (context, cuBLAS/cuDNN workspaces, kernel images) is an estimate per card
  (``m3lab.gpus``), not traced: the verdict's close-call margin covers its error.
"""

from m3lab.config import OPTIMIZERS
from m3lab.gpus import GIB
from m3lab.predict.allocator import allocator_round, segment_size
from m3lab.predict.geometry import bge_m3_config, load_model_config, model_geometry
from m3lab.predict.models import model_for
from m3lab.predict.prediction import TrainingWouldFail, predict, predict_many
from m3lab.predict.report import MemoryReport
from m3lab.predict.trace import CATEGORIES, MemoryTrace

__all__ = ["predict", "predict_many", "MemoryReport", "TrainingWouldFail", "load_model_config", "bge_m3_config", "model_geometry", "model_for",
           "allocator_round", "segment_size", "MemoryTrace", "CATEGORIES", "GIB", "OPTIMIZERS"]
