"""The drivers: a training step as HF Trainer runs it, with DeepSpeed's engine or with plain
autocast (HF AMP); each builds the optimizer, runs forward, backward and step.
"""

from __future__ import annotations

import contextlib

import torch

from m3lab import compat
from m3lab.config import Precision
from m3lab.errors import ConfigError
from m3lab.predict.optimizers import make_optimizer
from m3lab.predict.spec import TraceSpec


def deepspeed_buffers(engine) -> list:
    """DeepSpeed's own working buffers (the ZeRO gradient bucket), reported under "other"; only a ZeRO
    optimizer has them (``ipg_buckets``: m3lab.compat's TARGETS)."""
    found = []
    for bucket in (vars(engine.optimizer).get("ipg_buckets") or {}).values():
        found += [t for t in bucket.buffer or [] if isinstance(t, torch.Tensor)]
    return found


def grad_tensors(optimizer, model) -> list:
    """Every gradient the step holds: the parameters' own, and a ZeRO optimizer's averaged gradients and
    fp32 partitions' (``averaged_gradients``, ``single_partition_of_fp32_groups``: m3lab.compat's TARGETS)."""
    found = [p.grad for p in model.parameters() if p.grad is not None]
    averaged = vars(optimizer).get("averaged_gradients")
    if isinstance(averaged, dict):
        for item in averaged.values():
            found += [t for t in (item or []) if isinstance(t, torch.Tensor)]
    for group in vars(optimizer).get("single_partition_of_fp32_groups") or []:
        if group.grad is not None:
            found.append(group.grad)
    return found


def deepspeed_config(spec: TraceSpec) -> dict:
    """The run's DeepSpeed JSON with its "auto" values filled by HF's own ``HfTrainerDeepSpeedConfig``
    from the run's arguments (HF Trainer's defaults for the rest), as a real launch fills them; a
    value that contradicts the arguments is refused as HF refuses it."""
    import copy
    import dataclasses
    import types

    from transformers import TrainingArguments

    args = {f.name: f.default if f.default is not dataclasses.MISSING else None
            for f in dataclasses.fields(TrainingArguments)}
    args.update(world_size=spec.num_gpus, per_device_train_batch_size=spec.batch_size,
                gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.learning_rate,
                fp16=spec.precision is Precision.FP16, bf16=spec.precision is Precision.BF16,
                get_warmup_steps=lambda steps: spec.warmup_steps)
    args = types.SimpleNamespace(**args)
    with compat.hf_deepspeed_config(copy.deepcopy(spec.deepspeed)) as hf:
        try:
            hf.trainer_config_process(args)
            hf.trainer_config_finalize(args, types.SimpleNamespace(config=spec.model_config), spec.training_steps)
        except ValueError as error:
            raise ConfigError([f"--deepspeed: {' '.join(str(error).split())}"]) from None
        config = hf.config
    scheduler = config.get("scheduler") or {}
    warmup = (scheduler.get("params") or {}).get("warmup_num_steps")
    if isinstance(warmup, int) and warmup <= 0 and scheduler.get("type") in ("WarmupLR", "WarmupDecayLR",
                                                                             "WarmupCosineLR"):
        raise ConfigError([f"--deepspeed: the JSON's {scheduler['type']} scheduler gets warmup_num_steps {warmup} "
                           "(HF fills it from --warmup_steps/--warmup_ratio), and DeepSpeed refuses 0: a real launch "
                           "stops there. Pass --warmup_steps 1 or more (or a --warmup_ratio above 0)."])
    return config


class DeepSpeedDriver:
    """A training step as HF Trainer runs it with DeepSpeed: the engine's forward, backward, step."""

    def __init__(self, model, spec: TraceSpec):
        import deepspeed

        # already on the (fake) GPU; DeepSpeed's .to() would swap (Module.to: m3lab.compat's TARGETS)
        model.to = lambda *args, **kwargs: model
        config = deepspeed_config(spec)
        params = [p for p in model.parameters() if p.requires_grad]
        # Without an "optimizer" entry HF Trainer builds its own (--optim) and hands it to DeepSpeed
        optimizer = None if "optimizer" in config else make_optimizer(spec.optim, params, model)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                               config=config)
        self.optimizer = self.engine.optimizer
        if spec.allreduce_bucket_size is not None:
            compat.allreduce_chunk(self.engine, spec.allreduce_bucket_size)

    def loss(self, inputs):
        return self.engine(**inputs).loss

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()

    def buffers(self):
        return deepspeed_buffers(self.engine)


# The torch dtype of each half precision a run trains in
HALF = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


class PlainDriver:
    """A training step as HF Trainer runs it without DeepSpeed: autocast and GradScaler for
    fp16/bf16 (weights stay fp32), gradient clipping at max_grad_norm 1.0, the chosen optimizer."""

    def __init__(self, model, spec: TraceSpec):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(spec.optim, self.params, model)
        dtype = HALF.get(spec.precision)
        # CPU autocast stands in for CUDA autocast: both run matmuls and linears in half precision
        # and keep reductions (softmax, layer norm, losses) in fp32.
        self.autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler("cpu") if spec.precision is Precision.FP16 else None

    def loss(self, inputs):
        with self.autocast():
            return self.model(**inputs).loss

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self):
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        # GradScaler.step() only skips the update when found_inf (a float flag, which the trace
        # cannot read) is set; the healthy step is the optimizer's own.
        self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def buffers(self):
        return []

