"""The interface: ``TransparentLlm``, a stateful view of one batch run through a language model, and
``ModelInfo``. Method names and shapes are those of the LLM Transparency Tool's ``TransparentLlm``; where its
text is loose they are fixed here (``decomposed_attn`` is target-first, ``attention_output`` sums the heads
when ``head`` is None)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

Sentences = Union[str, bytes, Sequence[Union[str, bytes]]]


@dataclass(frozen=True)
class ModelInfo:
    """General facts about the model, available before any ``run``."""

    name: str
    n_params_estimate: int  # the order of magnitude of the parameter count, not the exact count
    n_layers: int
    n_heads: int  # attention heads of the layer with the most, every branch of it counted
    d_model: int
    d_vocab: int  # the width of ``unembed``'s and ``logits``' last dimension


class TransparentLlm(ABC):
    """A language model loaded at construction, whose internal state is the tensors of the last ``run``.

    Shapes: B = ``batch_size()``, N = positions of the longest row, d = ``d_model``. Methods that take
    ``batch_i`` cover that row's own positions, so a padded batch gives every row's exact tensors.
    """

    @abstractmethod
    def model_info(self) -> ModelInfo:
        """General info about the model; available before ``run``."""

    @abstractmethod
    def copy(self) -> "TransparentLlm":
        """Another instance on the same model, holding the same state; a later ``run`` on either leaves the
        other's state as it was."""

    @abstractmethod
    def run(self, sentences: Sentences) -> None:
        """Run the sentences as one batch and keep what the other methods read."""

    @abstractmethod
    def batch_size(self) -> int:
        """Rows in the last ``run``."""

    @abstractmethod
    def tokens(self) -> torch.Tensor:
        """Token ids ``[B, N]`` of the last ``run``."""

    @abstractmethod
    def tokens_to_strings(self, tokens: torch.Tensor) -> list[str]:
        """One display string per id of ``tokens`` ``[pos]``."""

    @abstractmethod
    def logits(self) -> torch.Tensor:
        """The model's next-token logits ``[B, N, d_vocab]``."""

    @abstractmethod
    def unembed(self, t: torch.Tensor, normalize: bool) -> torch.Tensor:
        """A residual-stream vector ``[d]`` (or ``[..., d]``) projected to the vocabulary ``[d_vocab]``
        (``[..., d_vocab]``); ``normalize`` applies the final normalisation first, so that
        ``unembed(residual_out(last), True)`` is ``logits()``."""

    # The residual stream.

    @abstractmethod
    def residual_in(self, layer: int) -> torch.Tensor:
        """The stream ``[B, N, d]`` entering ``layer`` (layer 0: the embedded tokens)."""

    @abstractmethod
    def residual_after_attn(self, layer: int) -> torch.Tensor:
        """The stream ``[B, N, d]`` after ``layer``'s attention, before its FFN is added."""

    @abstractmethod
    def residual_out(self, layer: int) -> torch.Tensor:
        """The stream ``[B, N, d]`` leaving ``layer`` (the next layer's ``residual_in``)."""

    # The feed-forward layer.

    @abstractmethod
    def ffn_out(self, layer: int) -> torch.Tensor:
        """What ``layer``'s FFN adds to the stream ``[B, N, d]``."""

    @abstractmethod
    def decomposed_ffn_out(self, batch_i: int, layer: int, pos: int) -> torch.Tensor:
        """Each neuron's addition ``[d_ffn, d]``: its activation times its output vector."""

    @abstractmethod
    def neuron_activations(self, batch_i: int, layer: int, pos: int) -> torch.Tensor:
        """The FFN's hidden layer ``[d_ffn]`` right after the activation function."""

    @abstractmethod
    def neuron_output(self, layer: int, neuron: int) -> torch.Tensor:
        """The vector ``[d]`` a neuron adds per unit of activation (a weight column; no activation)."""

    # Attention.

    @abstractmethod
    def attention_matrix(self, batch_i: int, layer: int, head: int) -> torch.Tensor:
        """Head ``head``'s weights ``[query_pos, key_pos]``, zero above the diagonal."""

    @abstractmethod
    def attention_output_per_head(self, batch_i: int, layer: int, pos: int, head: int) -> torch.Tensor:
        """What ``head`` adds to the stream at ``pos`` ``[d]``."""

    @abstractmethod
    def attention_output(self, batch_i: int, layer: int, pos: int, head: Optional[int] = None) -> torch.Tensor:
        """What the attention adds to the stream at ``pos`` ``[d]``: all of it (biases included) when ``head``
        is None, else that head's part."""

    @abstractmethod
    def decomposed_attn(self, batch_i: int, layer: int) -> torch.Tensor:
        """``[target, source, head, d]``: the vector each head carries from each source position into each
        target position."""
