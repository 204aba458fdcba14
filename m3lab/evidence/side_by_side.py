"""One training step of FlagEmbedding's M3 model with and without gradient caching, side by side.

``grad_cache_side_by_side`` builds the model as FlagEmbedding's runner loads it (the stand-in, on the
CPU, on every machine: the equality does not depend on size), turns dropout off so both steps see
the same network, encodes one batch from the data, and runs FlagEmbedding's own step and m3lab's
cached one. It returns each step's loss, what the step adds at its peak to the live tensors (measured
with m3lab.train.meter's live-tensor meter: activations, gradients, temporaries) and the relative
difference between their gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass
class Step:
    label: str
    loss: float
    # what the step adds at its peak to what was alive before it (weights, batch, anything else the
    # process holds): activations, gradients, temporaries; live tensor bytes measured on the CPU
    peak_bytes: int


@dataclass
class SideBySide:
    plain: Step
    cached: Step
    # |g_cached - g_plain| / |g_plain| over all parameters' gradients as one vector (per parameter it
    # would flag the attention keys' biases, whose true gradient is zero: softmax ignores them, so
    # theirs are float noise around 1e-10 in both steps)
    gradient_difference: float
    parameters_compared: int

    def describe(self) -> str:
        lines = [f"{step.label:34} loss {step.loss:.6f}   the step's peak {step.peak_bytes / 2**20:7.1f} MiB above "
                 "the weights, measured on CPU (live tensors)" for step in (self.plain, self.cached)]
        lines.append(f"gradients of {self.parameters_compared} parameters: relative difference "
                     f"{self.gradient_difference:.0e}")
        return "\n".join(lines)


def _batch(records: list[dict], tokenizer, group: int, query_max_len: int, passage_max_len: int) -> dict:
    queries = [r["query"] for r in records]
    passages = [p for r in records for p in (r["pos"][:1] + r["neg"][:group - 1])]

    def encode(texts, length):
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))

    return {"queries": encode(queries, query_max_len), "passages": encode(passages, passage_max_len)}


def _without_dropout(parts: dict) -> dict:
    parts = copy.deepcopy(parts)
    for module in parts["model"].modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):  # SDPA attention passes its dropout as a number
            module.dropout_prob = 0.0
    return parts


def _step(model, batch, label: str) -> tuple[Step, dict]:
    import gc

    from m3lab.tensors import LiveTensorBytes

    model.zero_grad(set_to_none=True)
    # A model dropped earlier may still sit in reference cycles: counted as alive at the start, it
    # would be collected during the step and hide that many of the step's bytes (seen on Python 3.13)
    gc.collect()
    with LiveTensorBytes(roots=list(model.parameters())) as meter:
        before = meter.current
        loss = model(**batch).loss
        loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return Step(label, loss.item(), meter.peak - before), grads


def grad_cache_side_by_side(model_path: str, records: list[dict], group: int = 8, chunk_size: int = 1,
                            query_max_len: int = 32, passage_max_len: int = 128) -> SideBySide:
    """FlagEmbedding's step and the cached step on the same batch (``records``: the data's lines)."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    from m3lab.train.grad_cache import use_grad_cache

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    parts = _without_dropout(EncoderOnlyEmbedderM3Runner.get_model(model_path, False, -1))
    batch = _batch(records, tokenizer, group, query_max_len, passage_max_len)

    def model():
        # as FlagEmbedding's M3 runner builds it for unified fine-tuning with self-distillation
        return EncoderOnlyEmbedderM3Model(copy.deepcopy(parts), tokenizer=tokenizer, temperature=0.02,
                                          normalize_embeddings=True, unified_finetuning=True,
                                          use_self_distill=True, self_distill_start_step=-1).train()

    plain, plain_grads = _step(model(), batch, "FlagEmbedding's step")
    cached, cached_grads = _step(use_grad_cache(model(), chunk_size), batch,
                                 f"grad cache, chunks of {chunk_size}")
    difference = sum(((cached_grads[n] - g) ** 2).sum() for n, g in plain_grads.items()).sqrt()
    scale = sum((g ** 2).sum() for g in plain_grads.values()).sqrt()
    return SideBySide(plain, cached, (difference / scale).item(), len(plain_grads))
