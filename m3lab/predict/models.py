"""The model a trace trains: its geometry (a transformers config) and the model built from it.

``build_m3_model`` builds FlagEmbedding's own M3 model as its runner does, with m3lab's levers;
``build_hf_model`` a sequence classifier as a plain HF Trainer run would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from m3lab.config import ConfigError

if TYPE_CHECKING:
    from m3lab.predict.spec import TraceSpec


def load_model_config(path: str | Path):
    """A transformers config from a config.json (or a folder holding one); no download."""
    from transformers import AutoConfig

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError([f"{path}: no such file; pass a model's config.json or the folder holding it."])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f"{path}:{error.lineno}" if isinstance(error, json.JSONDecodeError) else str(path)
        raise ConfigError([f"{where}: not valid JSON; pass a transformers config.json."]) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError([f"{path} has no \"model_type\"; it does not look like a transformers config.json."])
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (ValueError, TypeError) as error:
        raise ConfigError([f"{path}: transformers cannot build this config ({str(error).splitlines()[0]})."]) from None


def bge_m3_config():
    """BGE-M3's geometry (XLM-RoBERTa-large, 8,194 positions), built in: nothing is downloaded."""
    from transformers import XLMRobertaConfig

    from m3lab.standin import BGE_M3_CONFIG

    return XLMRobertaConfig(**BGE_M3_CONFIG)


def model_geometry(model: str):
    """The config of the model a run trains (its ``--model_name_or_path``), without downloading:
    BAAI/bge-m3 and the stand-ins are built in; a local folder is read; a hub id cannot be."""
    from transformers import XLMRobertaConfig

    from m3lab.standin import BGE_M3_CONFIG, FULL_SIZE_STANDIN, REAL_MODEL, STANDIN, STANDIN_SIZES, is_standin

    if model in (REAL_MODEL, FULL_SIZE_STANDIN):
        return bge_m3_config()
    if model == STANDIN:
        return XLMRobertaConfig(**{**BGE_M3_CONFIG, **STANDIN_SIZES, "vocab_size": STANDIN_TOKENS})
    path = Path(model).expanduser()
    if path.exists():
        return load_model_config(path)
    raise ConfigError([f"--model_name_or_path {model}: m3lab reads a model's shape from its config.json and does not "
                       f"download; pass the local folder that holds it (BAAI/bge-m3 is built in).",
                       ] if not is_standin(model) else [f"{model}: no such stand-in folder; build it with "
                                                         "`python -m m3lab.standin`."])


# The stand-in tokenizer's size (m3lab.standin: 4,000 SentencePiece pieces plus its special tokens)
STANDIN_TOKENS = 4002


class FakeTokenizer:
    """What EncoderOnlyEmbedderM3Model reads from its tokenizer: XLM-R's special token ids."""

    cls_token_id, pad_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    padding_side = "right"


def build_m3_model(spec: TraceSpec):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
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
    from m3lab.run_m3 import M3LabArguments, apply_levers

    apply_levers(model, M3LabArguments(efficient_sparse_head=spec.efficient_sparse_head,
                                       freeze_word_embeddings=spec.freeze_word_embeddings,
                                       grad_cache_chunk_size=spec.grad_cache_chunk_size))
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

    if spec.task != "sequence-classification":
        raise ConfigError([f"task {spec.task!r} is not modelled; use sequence-classification"])
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
        return build_m3_model(spec) if spec.trainer == "flagembedding-m3" else build_hf_model(spec)



def model_for(config, model_config=None):
    """The model a ``TrainConfig`` trains, as FlagEmbedding builds it with m3lab's levers, on the meta
    device (parameters without memory): for counting what trains and what is frozen."""
    from m3lab.predict.spec import spec_for

    return meta_model(spec_for(config, model_config))
