"""The SST-2 sentiment classifier: embedding → BiLSTM → masked max-pool → linear.

Padding never changes a result. Instead of ``pack_padded_sequence`` (which the
ONNX exporters handle badly), the backward direction runs a second, forward-only
LSTM over each sequence reversed *within its own length*; trailing padding then
comes after every real token in both directions, and pooling ignores it through
a mask. The same graph runs unchanged in PyTorch and ONNX Runtime.

Inputs: ``token_ids`` (``N×T`` int64, padded with ``PAD_ID``) and ``lengths``
(``N`` int64, each ≥ 1). Output: ``N×2`` logits (negative, positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.tokenizer import PAD_ID


@dataclass(frozen=True)
class SentimentClassifierConfig:
    vocab_size: int
    # Sized for a ~7 MB weights file with a ~10k-token vocabulary.
    embedding_dim: int = 128
    hidden_size: int = 192
    num_classes: int = 2
    embedding_dropout: float = 0.3
    output_dropout: float = 0.5


def reverse_within_lengths(sequences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each ``N×T×D`` sequence's first ``lengths[i]`` steps, leaving padding in place.

    The permutation is its own inverse, so applying it twice restores the input.
    """
    steps = torch.arange(sequences.shape[1], device=sequences.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    index = index.unsqueeze(2).expand(-1, -1, sequences.shape[2])
    return torch.gather(sequences, 1, index)


class SentimentClassifier(nn.Module):
    def __init__(self, config: SentimentClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.forward_lstm = nn.LSTM(config.embedding_dim, config.hidden_size, batch_first=True)
        self.backward_lstm = nn.LSTM(config.embedding_dim, config.hidden_size, batch_first=True)
        self.output_dropout = nn.Dropout(config.output_dropout)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_classes)

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding_dropout(self.embedding(token_ids))
        forward_states, _ = self.forward_lstm(embedded)
        reversed_states, _ = self.backward_lstm(reverse_within_lengths(embedded, lengths))
        backward_states = reverse_within_lengths(reversed_states, lengths)
        states = torch.cat([forward_states, backward_states], dim=2)
        steps = torch.arange(token_ids.shape[1], device=token_ids.device).unsqueeze(0)
        padding = (steps >= lengths.unsqueeze(1)).unsqueeze(2)
        pooled = states.masked_fill(padding, float("-inf")).amax(dim=1)
        return self.classifier(self.output_dropout(pooled))
