"""Gradient caching for FlagEmbedding's M3 unified loss: encoder memory that does not grow with the batch.

The idea is GradCache's (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"), the one sentence-transformers' CachedMultipleNegativesRankingLoss uses,
applied to the M3 loss (dense, sparse, ColBERT, their ensemble and self-distillation):

1. encode queries and passages in chunks of ``grad_cache_chunk_size`` texts (or, with
   ``grad_cache_chunk_tokens``, of as many texts as make about that many tokens at the batch's padded
   length: one count of tokens serves short and long batches alike) without a graph, remembering the
   random state each chunk ran with (for dropout);
2. compute FlagEmbedding's own loss on those representations, detached, and the gradient of the
   loss with respect to them, once;
3. when the trainer calls ``backward()`` on the loss, re-encode chunk by chunk with the same random
   state (the same dropout masks) and push the cached gradients through each chunk's graph.

Only one chunk's activations exist at a time, so the encoder's memory depends on the chunk, not on
batch x train_group_size; what still grows with them is the representations themselves (for
ColBERT, one vector per token) and the score matrices.

Step 2 runs in fp32 with autocast off: the gradients it caches are not loss-scaled, so computing
them in fp16 could underflow. The loss scale the trainer applies (DeepSpeed's or GradScaler's)
arrives in step 3 as the backward's incoming gradient and multiplies the cached gradients before
they meet the fp16 graph, as in an uncached fp16 step.

``use_grad_cache(model, chunk_size)`` switches a built FlagEmbedding M3 model (or m3lab's
efficient-sparse-head subclass of it) to this behaviour; parameters and state are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from FlagEmbedding.abc.finetune.embedder import EmbedderOutput
from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
    EncoderOnlyEmbedderM3Model,
)
from torch.utils.checkpoint import get_device_states, set_device_states


def chunk_rows(size: int, tokens: int, length: int) -> int:
    """Texts per chunk: ``size``, or as many texts of ``length`` tokens (padded) as ``tokens`` holds, at least 1."""
    return size if size else max(1, tokens // length)


def _chunks(features, size: int, tokens: int = 0) -> list[dict]:
    """Rows of a tokenized batch (or of each sub-batch FlagEmbedding's collator made) in chunks of ``size``
    texts, or of about ``tokens`` tokens at the part's padded length."""
    parts = features if isinstance(features, list) else [features]
    chunks = []
    for part in parts:
        rows, length = part["attention_mask"].shape
        step = chunk_rows(size, tokens, length)
        chunks += [{key: value[start:start + step] for key, value in part.items()} for start in range(0, rows, step)]
    return chunks


class _RandomState:
    """The CPU and GPU random state a chunk was encoded with, so its re-encoding drops the same units."""

    def __init__(self, chunk: dict):
        self.cpu = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*chunk.values())

    @contextlib.contextmanager
    def replay(self):
        """The random generators as they were for this chunk; the global state is restored after."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.device_states)
            yield


class _ReEncodeOnBackward(torch.autograd.Function):
    """Passes the loss value through; its backward runs the cached gradients through the encoder."""

    @staticmethod
    def forward(ctx, loss, anchor, backward_through_encoder):
        ctx.backward_through_encoder = backward_through_encoder
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.backward_through_encoder(grad_output)
        ctx.backward_through_encoder = None  # one backward per step, as for any graph
        return None, None, None


class GradCacheM3Model(EncoderOnlyEmbedderM3Model):
    """FlagEmbedding's M3 model whose training forward caches gradients (the loss and heads are FlagEmbedding's)."""
    grad_cache_chunk_size: int = 0
    grad_cache_chunk_tokens: int = 0
    _cached_representations: list | None = None

    def encode(self, features):
        if self._cached_representations:  # step 2: FlagEmbedding's loss reads the cached representations
            return self._cached_representations.pop(0)
        return super().encode(features)

    def forward(self, queries=None, passages=None, teacher_scores=None, no_in_batch_neg_flag: bool = False):
        if not (self.training and torch.is_grad_enabled()) or (self.grad_cache_chunk_size < 1
                                                                and self.grad_cache_chunk_tokens < 1):
            return super().forward(queries, passages, teacher_scores, no_in_batch_neg_flag)

        # 1. every chunk encoded without a graph, with its random state remembered
        chunks, states, representations = [], [], []  # per side: queries, passages
        with torch.no_grad(), warnings.catch_warnings():
            # without a graph nothing is checkpointed; reentrant checkpointing warns that no input
            # needs a gradient, which is the point here
            warnings.filterwarnings("ignore", "None of the inputs have requires_grad=True")
            for features in (queries, passages):
                side = _chunks(features, self.grad_cache_chunk_size, self.grad_cache_chunk_tokens)
                chunks.append(side)
                states.append([])
                representations.append([])
                for chunk in side:
                    states[-1].append(_RandomState(chunk))
                    representations[-1].append(self._encode(chunk))
        device = chunks[0][0]["attention_mask"].device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

        # 2. FlagEmbedding's loss on detached fp32 copies, and its gradient with respect to them
        leaves = [tuple(None if reps[0][kind] is None else
                        torch.cat([r[kind] for r in reps]).float().requires_grad_() for kind in range(3))
                  for reps in representations]
        del representations
        self._cached_representations = list(leaves)
        try:
            with torch.autocast(device, enabled=False):
                loss = super().forward(queries, passages, teacher_scores, no_in_batch_neg_flag).loss
        finally:
            self._cached_representations = None
        flat = [leaf for side in leaves for leaf in side if leaf is not None]
        grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
        # each chunk's share of the gradient of each representation (dense, sparse, ColBERT)
        chunk_grads = []
        for side, side_leaves in zip(chunks, leaves):
            rows = [chunk["attention_mask"].size(0) for chunk in side]
            per_kind = [None if leaf is None else _split(next(grads), rows) for leaf in side_leaves]
            chunk_grads.append([[None if g is None else g[i] for g in per_kind] for i in range(len(side))])
        del leaves, flat

        # 3. the loss whose backward re-encodes chunk by chunk and back-propagates the cached gradients
        def backward_through_encoder(grad_output):
            with torch.enable_grad():
                for side, side_states, side_grads in zip(chunks, states, chunk_grads):
                    for chunk, state, grads_of_chunk in zip(side, side_states, side_grads):
                        with state.replay(), torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
                            reps = self._encode(chunk)
                        pairs = [(rep, (g * grad_output).to(rep.dtype))
                                 for rep, g in zip(reps, grads_of_chunk) if rep is not None and g is not None]
                        if pairs:
                            torch.autograd.backward([rep for rep, _ in pairs], [g for _, g in pairs])
                        del reps, pairs

        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        return EmbedderOutput(loss=_ReEncodeOnBackward.apply(loss.detach(), anchor, backward_through_encoder))


def _split(grad, rows: list[int]) -> list:
    return None if grad is None else list(grad.split(rows))


@functools.cache
def _with_grad_cache(model_class: type) -> type:
    """GradCacheM3Model on top of ``model_class`` (FlagEmbedding's model or a subclass such as m3lab's
    efficient sparse head), so that both changes apply."""
    if issubclass(model_class, GradCacheM3Model):
        return model_class
    if model_class is EncoderOnlyEmbedderM3Model:
        return GradCacheM3Model
    return type(f"GradCache{model_class.__name__}", (GradCacheM3Model, model_class), {"__module__": __name__})


def use_grad_cache(model: EncoderOnlyEmbedderM3Model, chunk_size: int = 0,
                   chunk_tokens: int = 0) -> EncoderOnlyEmbedderM3Model:
    """Switch a built FlagEmbedding M3 model to gradient caching with chunks of ``chunk_size`` texts, or of
    about ``chunk_tokens`` tokens (one of the two)."""
    if not isinstance(model, EncoderOnlyEmbedderM3Model):
        raise TypeError(f"expected FlagEmbedding's EncoderOnlyEmbedderM3Model, got {type(model).__name__}")
    if (chunk_size < 1) == (chunk_tokens < 1):
        raise ValueError(f"grad_cache_chunk_size is {chunk_size} and grad_cache_chunk_tokens {chunk_tokens}; give "
                         "one of them, 1 or more: texts per chunk, or tokens per chunk.")
    model.__class__ = _with_grad_cache(type(model))  # the subclass adds no parameters, only the forward
    model.grad_cache_chunk_size, model.grad_cache_chunk_tokens = max(0, chunk_size), max(0, chunk_tokens)
    return model
