"""What a trace needs to know about a run, built from a ``TrainConfig`` in one place (``spec_for``).

``TraceSpec`` is private to the predictor: people describe a run with ``TrainConfig`` (or paste its
command, ``m3lab.command``); this is that run reduced to what changes memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab.config import LORA_TARGETS, Precision, Trainer
from m3lab.errors import ConfigError
from m3lab.predict.geometry import model_geometry

# The optimizer steps DeepSpeed's scheduler is given when a run counts epochs ("auto" total steps):
# they change no memory, and the predictor reads no data to count them
STEPS_WHEN_COUNTED_IN_EPOCHS = 1000


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter on the encoder (``m3lab.train.lora``), as ``--use_lora True`` and its flags give it."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] = LORA_TARGETS


@dataclass
class TraceSpec:
    """One run as the trace sees it (see ``spec_for``)."""

    trainer: Trainer = Trainer.FLAGEMBEDDING_M3
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
    grad_cache_chunk_tokens: int = 0  # 0: off (chunks by texts, or no cache)
    lora: LoraAdapter | None = None  # None: the encoder's own weights train
    # hf: a sequence classifier
    seq_len: int = 512
    num_labels: int = 2
    # both
    precision: Precision = Precision.FP32
    optim: str = "adamw_torch"
    learning_rate: float = 1e-5
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    deepspeed: dict | None = None  # a DeepSpeed JSON as a dict, or None
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage (None: no DeepSpeed)
    offloads: bool = False  # DeepSpeed keeps the optimizer in host memory (ZeRO offload_optimizer to cpu)
    num_gpus: int = 1
    training_steps: int = STEPS_WHEN_COUNTED_IN_EPOCHS  # DeepSpeed's scheduler ("auto" step counts); no memory effect
    warmup_steps: int = 0
    # ZeRO-0's gradient all-reduce chunk (elements); None: DeepSpeed's fixed 5e8. Shallow copies
    # get a smaller one (see extrapolate.shallow_specs); it is not a DeepSpeed JSON setting.
    allreduce_bucket_size: int | None = None


def _padded(length: int, multiple: int | None) -> int:
    """The length FlagEmbedding's collator pads a full-length text to (``pad_to_multiple_of``)."""
    return -(-length // multiple) * multiple if multiple else length


def spec_for(config, model_config=None) -> TraceSpec:
    """The TraceSpec of a ``TrainConfig``; the model's geometry is ``model_config`` or read from
    ``config.model`` (BGE-M3's built in, a local folder's config.json otherwise)."""
    config.check()
    deepspeed, stage, offloads = config.deepspeed_config(), config.deepspeed_stage, config.offload_optimizer
    if config.deepspeed_stage is not None and config.deepspeed_config_file is not None:
        from m3lab import deepspeed_json

        file = deepspeed_json.read(config.deepspeed_config_file)  # the run's own JSON, as it is
        deepspeed, stage, offloads = file.settings, file.stage, file.offload_optimizer
    geometry = model_config if model_config is not None else model_geometry(config.model)
    _check_lengths(config, geometry)
    steps = config.max_steps if config.max_steps > 0 else STEPS_WHEN_COUNTED_IN_EPOCHS
    return TraceSpec(
        trainer=Trainer(config.trainer), model_config=geometry,
        batch_size=config.per_device_train_batch_size,
        query_max_len=_padded(config.query_max_len, config.pad_to_multiple_of),
        passage_max_len=_padded(config.passage_max_len, config.pad_to_multiple_of),
        train_group_size=config.train_group_size,
        unified_finetuning=config.unified_finetuning, use_self_distill=config.use_self_distill,
        fix_encoder=config.fix_encoder, negatives_cross_device=config.negatives_cross_device,
        sub_batch_size=config.sub_batch_size,
        efficient_sparse_head=config.efficient_sparse_head, freeze_word_embeddings=config.freeze_word_embeddings,
        grad_cache_chunk_size=config.grad_cache_chunk_size, grad_cache_chunk_tokens=config.grad_cache_chunk_tokens,
        seq_len=config.seq_len,
        lora=LoraAdapter(config.lora_rank, config.lora_alpha, config.lora_dropout, tuple(config.target_modules))
        if config.use_lora else None,
        optim=config.optim, learning_rate=config.learning_rate,
        attn_implementation=config.attn_implementation,
        precision=Precision.FP16 if config.fp16 else (Precision.BF16 if config.bf16 else Precision.FP32),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        deepspeed=deepspeed, zero_stage=stage, offloads=offloads,
        num_gpus=config.num_processes, training_steps=steps,
        warmup_steps=config.warmup_steps_for(steps),
    )


def _check_lengths(config, geometry) -> None:
    """Refuse lengths the model has no positions for (XLM-R's positions start after the padding id)."""
    positions = getattr(geometry, "max_position_embeddings", None)
    if positions is None:
        return
    if "roberta" in getattr(geometry, "model_type", ""):
        positions -= getattr(geometry, "pad_token_id", 1) + 1
    names = ("seq_len",) if config.trainer == Trainer.HF else ("query_max_len", "passage_max_len")
    too_long = [f"{name} is {getattr(config, name):,}, beyond the model's {positions:,} positions; it cannot "
                f"encode more. Use {positions} or less." for name in names if getattr(config, name) > positions]
    if too_long:
        raise ConfigError(too_long)
