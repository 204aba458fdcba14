"""What a trace needs to know about a run, built from a ``TrainConfig`` in one place (``spec_for``).

``TraceSpec`` is private to the predictor: people describe a run with ``TrainConfig`` (or paste its
command, ``m3lab.predict.paste``); this is that run reduced to what changes memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from m3lab.config import ConfigError
from m3lab.predict.models import model_geometry

# DeepSpeed optimizer types the trace builds as DeepSpeed would (case-insensitive, as DeepSpeed reads them)
DEEPSPEED_OPTIMIZERS = ("adam", "adamw")


@dataclass
class TraceSpec:
    """One run as the trace sees it (see ``spec_for``)."""

    trainer: str = "flagembedding-m3"  # or "hf"
    model_config: object = None  # a transformers PretrainedConfig
    batch_size: int = 1
    # flagembedding-m3
    query_max_len: int = 512  # tokens per query, as padded (every text assumed full length)
    passage_max_len: int = 512
    train_group_size: int = 8
    unified_finetuning: bool = True
    use_self_distill: bool = False
    fix_encoder: bool = False
    negatives_cross_device: bool = False
    sub_batch_size: int | None = None  # FlagEmbedding's --sub_batch_size (None: encode all at once)
    efficient_sparse_head: bool = False
    freeze_word_embeddings: bool = False
    grad_cache_chunk_size: int = 0  # 0: off
    # hf
    task: str = "sequence-classification"
    seq_len: int = 512
    num_labels: int = 2
    # both
    precision: str = "fp32"  # fp32, fp16, bf16
    optim: str = "adamw_torch"
    learning_rate: float = 1e-5
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    deepspeed: dict | None = None  # a DeepSpeed JSON as a dict, or None
    num_gpus: int = 1
    training_steps: int = 1000  # for DeepSpeed's scheduler entry ("auto" step counts); no memory effect
    warmup_steps: int = 0
    # ZeRO-0's gradient all-reduce chunk (elements); None: DeepSpeed's fixed 5e8. Shallow copies
    # get a smaller one (see extrapolate.shallow_specs); it is not a DeepSpeed JSON setting.
    allreduce_bucket_size: int | None = None

    @property
    def offloads(self) -> bool:
        """Whether DeepSpeed keeps the optimizer in host memory (ZeRO offload_optimizer to cpu)."""
        zero = (self.deepspeed or {}).get("zero_optimization", {})
        return (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu"


def _padded(length: int, multiple: int | None) -> int:
    """The length FlagEmbedding's collator pads a full-length text to (``pad_to_multiple_of``)."""
    return -(-length // multiple) * multiple if multiple else length


def spec_for(config, model_config=None) -> TraceSpec:
    """The TraceSpec of a ``TrainConfig``; the model's geometry is ``model_config`` or read from
    ``config.model`` (BGE-M3's built in, a local folder's config.json otherwise)."""
    config.check()
    deepspeed = None
    if config.deepspeed_stage is not None:
        deepspeed = (config.deepspeed_config() if config.deepspeed_config_file is None
                     else read_deepspeed_json(config.deepspeed_config_file))
    geometry = model_config if model_config is not None else model_geometry(config.model)
    _check_lengths(config, geometry)
    steps = config.max_steps if config.max_steps > 0 else 1000
    return TraceSpec(
        trainer=config.trainer, model_config=geometry,
        batch_size=config.per_device_train_batch_size,
        query_max_len=_padded(config.query_max_len, config.pad_to_multiple_of),
        passage_max_len=_padded(config.passage_max_len, config.pad_to_multiple_of),
        train_group_size=config.train_group_size,
        unified_finetuning=config.unified_finetuning, use_self_distill=config.use_self_distill,
        fix_encoder=config.fix_encoder, negatives_cross_device=config.negatives_cross_device,
        sub_batch_size=config.sub_batch_size,
        efficient_sparse_head=config.efficient_sparse_head, freeze_word_embeddings=config.freeze_word_embeddings,
        grad_cache_chunk_size=config.grad_cache_chunk_size, seq_len=config.seq_len,
        optim=config.optim, learning_rate=config.learning_rate,
        attn_implementation=config.attn_implementation,
        precision="fp16" if config.fp16 else ("bf16" if config.bf16 else "fp32"),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=deepspeed, num_gpus=config.num_processes,
        training_steps=steps, warmup_steps=math.ceil(config.warmup_ratio * steps),
    )


def _check_lengths(config, geometry) -> None:
    """Refuse lengths the model has no positions for (XLM-R's positions start after the padding id)."""
    positions = getattr(geometry, "max_position_embeddings", None)
    if positions is None:
        return
    if "roberta" in getattr(geometry, "model_type", ""):
        positions -= getattr(geometry, "pad_token_id", 1) + 1
    names = ("seq_len",) if config.trainer == "hf" else ("query_max_len", "passage_max_len")
    too_long = [f"{name} is {getattr(config, name):,}, beyond the model's {positions:,} positions; it cannot "
                f"encode more. Use {positions} or less." for name in names if getattr(config, name) > positions]
    if too_long:
        raise ConfigError(too_long)


def read_deepspeed_json(path: str | Path) -> dict:
    """A DeepSpeed JSON the predictor can trace, or ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--deepspeed {path}: no such file; give the path of your DeepSpeed JSON."])
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError([f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file."]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a text file; --deepspeed takes a DeepSpeed JSON."]) from None
    if not isinstance(ds, dict):
        raise ConfigError([f"{path}: a DeepSpeed config is a JSON object ({{...}}), not {type(ds).__name__}."])
    problems = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 3:
        problems.append(f"{path}: ZeRO stage 3 is not modelled (m3lab predicts stages 0, 1 and 2); a one-GPU run "
                        "gains nothing from stage 3 over stage 2 with offload. Use stage 0, 1 or 2.")
    elif stage not in (0, 1, 2):
        problems.append(f"{path}: zero_optimization.stage is {stage!r}; DeepSpeed's stages are 0 to 3.")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", "cpu"):
        problems.append(f"{path}: offload_optimizer to {offload!r} is not modelled; use \"cpu\" or none.")
    if (zero.get("offload_param") or {}).get("device", "none") != "none":
        problems.append(f"{path}: offload_param is a ZeRO-3 feature and is not modelled; remove it.")
    optimizer = (ds.get("optimizer") or {}).get("type")
    if optimizer is not None and str(optimizer).lower() not in DEEPSPEED_OPTIMIZERS:
        problems.append(f"{path}: optimizer type {optimizer!r} is not modelled; m3lab traces DeepSpeed's Adam "
                        "and AdamW (FusedAdam, or torch's with \"torch_adam\": true).")
    if problems:
        raise ConfigError(problems)
    return ds
