"""The model a trace trains, built from its geometry (``m3lab.predict.geometry``).

``build_m3_model`` builds FlagEmbedding's own M3 model as its runner does, with m3lab's levers;
``build_hf_model`` a sequence classifier as a plain HF Trainer run would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from m3lab import compat
from m3lab.config import Trainer

if TYPE_CHECKING:
    from m3lab.predict.spec import TraceSpec


class FakeTokenizer:
    """What EncoderOnlyEmbedderM3Model reads from its tokenizer: XLM-R's special token ids."""

    cls_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    padding_side = "right"


def build_m3_model(spec: TraceSpec):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from transformers import AutoModel

    encoder = AutoModel.from_config(spec.model_config, attn_implementation=spec.attn_implementation)
    # An encoder keeps no key/value cache in training; transformers 5 warns on every checkpointed
    # trace unless the config says so (no memory changes: the cache is only for decoders)
    encoder.config.use_cache = False
    hidden = spec.model_config.hidden_size
    parts = {"model": encoder, "colbert_linear": torch.nn.Linear(hidden, hidden),
             "sparse_linear": torch.nn.Linear(hidden, 1)}
    # The keyword arguments FlagEmbedding's runner passes (m3/runner.py), at the tutorial's values.
    model = EncoderOnlyEmbedderM3Model(
        parts, tokenizer=FakeTokenizer(), negatives_cross_device=spec.negatives_cross_device,
        temperature=0.02, sub_batch_size=spec.sub_batch_size, kd_loss_type="m3_kd_loss", sentence_pooling_method="cls",
        normalize_embeddings=True, unified_finetuning=spec.unified_finetuning,
        use_self_distill=spec.use_self_distill, self_distill_start_step=0)
    from m3lab.config import M3LabArguments
    from m3lab.train.runner import apply_levers

    lora = spec.lora
    with compat.lora_adapters_as_built():
        apply_levers(model, M3LabArguments(efficient_sparse_head=spec.efficient_sparse_head,
                                           freeze_word_embeddings=spec.freeze_word_embeddings,
                                           grad_cache_chunk_size=spec.grad_cache_chunk_size,
                                           grad_cache_chunk_tokens=spec.grad_cache_chunk_tokens,
                                           use_lora=lora is not None, **({} if lora is None else dict(
                                               lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=list(lora.targets)))))
    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if spec.fix_encoder:
        for name, param in model.named_parameters():
            if "colbert_linear" not in name and "sparse_linear" not in name:
                param.requires_grad = False
    return model


def m3_inputs(spec: TraceSpec):
    def features(rows, length):
        return {"input_ids": torch.ones(rows, length, dtype=torch.long),
                "attention_mask": torch.ones(rows, length, dtype=torch.long)}

    return {"queries": features(spec.batch_size, spec.query_max_len),
            "passages": features(spec.batch_size * spec.train_group_size, spec.passage_max_len),
            "teacher_scores": None, "no_in_batch_neg_flag": False}


def build_hf_model(spec: TraceSpec):
    from transformers import AutoModelForSequenceClassification

    config = spec.model_config
    config.num_labels = spec.num_labels
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=spec.attn_implementation)
    model.config.use_cache = False  # as in build_m3_model
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def hf_inputs(spec: TraceSpec):
    return {"input_ids": torch.ones(spec.batch_size, spec.seq_len, dtype=torch.long),
            "attention_mask": torch.ones(spec.batch_size, spec.seq_len, dtype=torch.long),
            "labels": torch.zeros(spec.batch_size, dtype=torch.long)}


def meta_model(spec: TraceSpec):
    """The model ``spec`` trains, on the meta device (parameters without memory), for counting."""
    import dataclasses

    spec = dataclasses.replace(spec, negatives_cross_device=False)  # needs a process group; adds no parameters
    with torch.device("meta"):
        return build_m3_model(spec) if spec.trainer is Trainer.FLAGEMBEDDING_M3 else build_hf_model(spec)



def model_for(config, model_config=None):
    """The model a ``TrainConfig`` trains, as FlagEmbedding builds it with m3lab's levers, on the meta
    device (parameters without memory): for counting what trains and what is frozen."""
    from m3lab.predict.spec import spec_for

    return meta_model(spec_for(config, model_config))
