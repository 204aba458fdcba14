"""A memory-efficient sparse head for training FlagEmbedding's M3 model: O(batch x vocab).

FlagEmbedding's ``_sparse_embedding`` in training mode scatters every token's weight into a
``zeros(batch, seq_len, vocab_size)`` tensor and takes the max over tokens: 61 GiB in fp16 for
16 passages of 8,192 tokens. The same values come from one ``scatter_reduce(amax)`` into a
``(batch, vocab_size)`` tensor, which its eval branch already uses (FlagEmbedding issue #1364);
training reverted it (PR #1425) because of an autograd error, caused by the in-place
``sparse_embedding[:, unused_tokens] *= 0.`` that follows on a tensor scatter_reduce saved for
backward. Here the unused tokens are zeroed out of place, so backward works. Gradients equal
FlagEmbedding's up to ties between equal token weights within a text, which its max sends to one
position and scatter_reduce shares out (tests: loss and every gradient within 1e-6 relative).

``EfficientSparseM3Model`` subclasses FlagEmbedding's model and changes only this method, so an
existing model can be switched with ``use_efficient_sparse_head(model)``.
"""

from __future__ import annotations

import torch
from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
    EncoderOnlyEmbedderM3Model,
)


class EfficientSparseM3Model(EncoderOnlyEmbedderM3Model):
    """FlagEmbedding's M3 model with an O(batch x vocab) sparse embedding in training too."""

    def _sparse_embedding(self, hidden_state, input_ids, return_embedding: bool = True):
        token_weights = torch.relu(self.sparse_linear(hidden_state))
        if not return_embedding:
            return token_weights
        # Token weights are >= 0 (relu), so a zero start value is what the (batch, seq, vocab)
        # version's untouched zeros give for tokens that do not occur.
        sparse_embedding = torch.zeros(input_ids.size(0), self.vocab_size, dtype=token_weights.dtype,
                                       device=token_weights.device)
        sparse_embedding = sparse_embedding.scatter_reduce(
            dim=-1, index=input_ids, src=token_weights.squeeze(-1), reduce="amax", include_self=True)
        unused_tokens = [self.tokenizer.cls_token_id, self.tokenizer.eos_token_id,
                         self.tokenizer.pad_token_id, self.tokenizer.unk_token_id]
        keep = torch.ones(self.vocab_size, dtype=sparse_embedding.dtype, device=sparse_embedding.device)
        keep[unused_tokens] = 0.0
        return sparse_embedding * keep  # out of place: scatter_reduce's result is saved for backward


def use_efficient_sparse_head(model: EncoderOnlyEmbedderM3Model) -> EncoderOnlyEmbedderM3Model:
    """Switch a built FlagEmbedding M3 model to the efficient sparse head (same parameters, same state)."""
    if not isinstance(model, EncoderOnlyEmbedderM3Model):
        raise TypeError(f"expected FlagEmbedding's EncoderOnlyEmbedderM3Model, got {type(model).__name__}")
    model.__class__ = EfficientSparseM3Model  # the subclass adds no state, only the method
    return model
