"""AGIFORMER as a Hugging Face ``transformers`` model (the ``hf`` extra).

    import agiformer.hf                                  # registers "agiformer" with the Auto classes
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported/")     # written by python -m agiformer.export
    out = model(input_ids, labels=input_ids)                       # out.loss, out.logits [B, L, 256]

``AgiformerConfig`` holds the model config (``AGIFORMER.from_config``'s keys: sizes, ``architecture``
and the model-level components) and ``seq_len``, the byte window the model was trained on.
``AgiformerForCausalLM`` wraps an ``AGIFORMER`` as ``.model`` (state_dict keys ``model.<v1 key>``); its
weights are saved as ``model.safetensors`` beside ``config.json``.

Inputs are bytes: ``input_ids`` ``[B, L]`` of values 0..255 (``list(text.encode())``). Logits follow the
causal-LM convention ``logits[:, t]`` = the next byte's distribution after ``input_ids[:, :t + 1]``, so
``labels = input_ids`` gives the usual shifted loss (see ``next_byte_logits`` for how bytes inside a patch
are predicted). The bytes of the first patch have no prediction: ``logits[:, :P − 1]`` are zeros and the
loss leaves them out, so ``loss`` over a window equals ``AGIFORMER.sequence_loss`` of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput
except ImportError as e:
    raise ImportError(f'agiformer.hf needs transformers 5 and safetensors: pip install "agiformer-kernels[hf]" '
                      f"({e})") from e

from .components import MODEL_KEYS
from .components.config import SIZES
from .model import AGIFORMER

MODEL_TYPE = "agiformer"
DEFAULT_SEQ_LEN = 1024  # v1's training window, for a model that does not record its own


def next_byte_logits(model: AGIFORMER, input_ids: torch.Tensor) -> torch.Tensor:
    """Bytes ``[B, L]`` (L ≥ P) -> logits ``[B, L, 256]``, ``[:, t]`` predicting byte t + 1 from bytes 0..t.

    Byte j ≥ P lies in patch k = j // P: the latent of the complete patches 0..k−1 gives the head's
    context, and the bytes of patch k before j are teacher-forced into the head, so each byte's logits see
    exactly the bytes before it (the prediction of the byte after the input, t = L − 1, included). Bytes
    of the first patch are not predicted: ``[:, :P − 1]`` are zeros."""
    P = model.patch_size
    L = input_ids.shape[1]
    if L < P:
        raise ValueError(f"input_ids: {L} bytes per row; the model predicts a byte only after a whole patch "
                         f"(patch_size = {P} bytes)")
    n = L // P  # complete patches: latents 0..n−1 predict bytes P .. (n + 1)·P − 1, which reach byte L
    target = F.pad(input_ids[:, P:], (0, n * P - (L - P)))  # pad from byte L on: only later bytes' logits see it
    logits = model(input_ids[:, : n * P], target).flatten(1, 2)[:, : L - P + 1]
    return F.pad(logits, (0, 0, P - 1, 0))


class AgiformerConfig(PretrainedConfig):
    """The model config of ``AGIFORMER.from_config`` (v1's values by default) and ``seq_len``."""

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "num_heads"}

    def __init__(self, d_model: int = SIZES["d_model"], n_layers: int = SIZES["n_layers"],
                 num_heads: int = SIZES["num_heads"], patch_size: int = SIZES["patch_size"],
                 window_size: int = SIZES["window_size"], vocab_size: int = SIZES["vocab_size"],
                 dropout: float = SIZES["dropout"], thinking_steps: int = SIZES["thinking_steps"],
                 architecture=None, embedding: Optional[dict] = None, final_norm: Optional[dict] = None,
                 top: Optional[dict] = None, head: Optional[dict] = None, seq_len: int = DEFAULT_SEQ_LEN, **kwargs):
        self.d_model, self.n_layers, self.num_heads, self.patch_size = d_model, n_layers, num_heads, patch_size
        self.window_size, self.vocab_size, self.dropout = window_size, vocab_size, dropout
        self.thinking_steps, self.architecture, self.embedding = thinking_steps, architecture, embedding
        self.final_norm, self.top, self.head, self.seq_len = final_norm, top, head, seq_len
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: dict, seq_len: int = DEFAULT_SEQ_LEN) -> "AgiformerConfig":
        """From ``AGIFORMER.config`` (or any dict ``AGIFORMER.from_config`` takes)."""
        return cls(**config, seq_len=seq_len)

    def model_config(self) -> dict:
        """The dict ``AGIFORMER.from_config`` builds the model from."""
        return {k: getattr(self, k) for k in MODEL_KEYS}


class AgiformerForCausalLM(PreTrainedModel, GenerationMixin):
    """``AGIFORMER`` (``.model``) behind the causal-LM interface of ``transformers``: ``forward`` returns a
    ``CausalLMOutput``, ``save_pretrained``/``from_pretrained`` write and read ``config.json`` and
    ``model.safetensors``, ``generate`` works (recomputing the whole input each step: for long outputs
    ``agiformer.generation.generate(hf_model.model, …)`` streams in O(1) a patch). ``backend`` picks the op
    backend (None: fastest available)."""

    config_class = AgiformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: AgiformerConfig, *, backend: Optional[str] = None, model: Optional[AGIFORMER] = None):
        super().__init__(config)
        self.model = model if model is not None else AGIFORMER.from_config(config.model_config(), backend=backend)
        self.post_init()

    @classmethod
    def from_agiformer(cls, model: AGIFORMER, seq_len: int = DEFAULT_SEQ_LEN) -> "AgiformerForCausalLM":
        """Wraps ``model`` itself (its weights, not a copy)."""
        return cls(AgiformerConfig.from_model_config(model.config, seq_len), model=model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # AGIFORMER initialises its own modules (v1's PyTorch defaults)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutput:
        """``input_ids`` ``[B, L]`` bytes -> ``CausalLMOutput(loss, logits [B, L, 256])``; ``labels``
        ``[B, L]`` (usually ``input_ids``; -100 leaves a byte out) give ``loss``, the mean cross-entropy of
        ``labels[:, t + 1]`` under ``logits[:, t]`` over the bytes from P on. ``attention_mask`` may only
        mark right padding (the model is causal: padding after a byte never changes its logits)."""
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask: only right padding is supported (a 0 followed by a 1 in a row)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: shape [B, L], got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or (input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > 255)):
            raise ValueError("input_ids: bytes, integers 0..255")
        logits = next_byte_logits(self.model, input_ids.long())
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: shape {tuple(labels.shape)}, input_ids {tuple(input_ids.shape)}")
            target = labels[:, 1:].clone()
            target[:, : self.model.patch_size - 1] = -100  # bytes of the first patch: no prediction
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten().long(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        return {"input_ids": input_ids}  # no cache: each step reads the whole input


AutoConfig.register(MODEL_TYPE, AgiformerConfig)
AutoModelForCausalLM.register(AgiformerConfig, AgiformerForCausalLM)
