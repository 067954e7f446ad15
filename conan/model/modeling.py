"""The Conan decoder, read top to bottom: embeddings → N × (attention + SwiGLU) → norm → heads.

ConanModel returns token states under a chosen attention mode; ConanForCausalLM adds the language
modelling head (tied to the input embeddings) for pretraining and SFT; ConanForEmbedding adds
pooling and Matryoshka truncation for the embedding stages. All three share the `model.` weight
prefix, so each stage loads the directory the previous stage exported.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .attention import (AttentionMask, AttentionMode, ConanAttention, PackedRow, attention_kernel, rotary_tables,
                        sdpa_dtype)
from .configuration import ConanConfig
from .lm_loss import causal_lm_loss
from .pooling import matryoshka_truncate, pool, pool_packed


class ConanMLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: ConanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x))."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ConanDecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ConanConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = ConanAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = ConanMLP(config)

    def forward(self, x: torch.Tensor, rotary, mask_args: dict) -> torch.Tensor:
        """x + attention(norm(x)), then + mlp(norm(·))."""
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask_args)
        return x + self.mlp(self.post_attention_layernorm(x))


# Every export carries these source files and an auto_map: AutoModel / AutoModelForCausalLM load it with
# trust_remote_code=True where Conan is not installed (with `import conan` the registered classes serve).
REMOTE_CODE_FILES = ("configuration.py", "modeling.py", "attention.py", "soft_mask.py", "pooling.py", "lm_loss.py")
REMOTE_CODE_AUTO_MAP = {"AutoConfig": "configuration.ConanConfig", "AutoModel": "modeling.ConanModel",
                        "AutoModelForCausalLM": "modeling.ConanForCausalLM"}


class ConanPreTrainedModel(PreTrainedModel):
    """Shared loading/saving behaviour of the Conan models."""

    config_class = ConanConfig
    base_model_prefix = "model"
    _no_split_modules = ["ConanDecoderLayer"]
    supports_gradient_checkpointing = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """PreTrainedModel.save_pretrained, plus the auto_map and the model's source files (remote code)."""
        self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        for name in REMOTE_CODE_FILES:
            shutil.copy2(Path(__file__).with_name(name), Path(save_directory) / name)


class ConanModel(ConanPreTrainedModel):
    """Decoder stack returning the final token states."""

    def __init__(self, config: ConanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ConanDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        """Replace the token embedding table."""
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                attention_mode: AttentionMode | None = None, soft_mask_alpha: float = 0.0,
                soft_mask_rank_reduction: bool = True, documents: torch.Tensor | None = None,
                **_) -> BaseModelOutput:
        """Token states of right-padded input_ids under the causal, bidirectional or soft mask
        (None = config.attention_mode). With `documents` (length,), input_ids is one packed row (batch 1, no
        padding) of texts back to back, document 0, 1, …: each token attends within its text, positions restart."""
        attention_mode = attention_mode or self.config.attention_mode
        b, l = input_ids.shape
        packed = None
        if documents is not None:
            if b != 1 or attention_mask is not None:
                raise ValueError("a packed row is one unpadded sequence: batch 1, no attention_mask")
            packed = PackedRow.of(documents)
        longest = l if packed is None else packed.longest
        if longest > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {longest} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        x = self.embed_tokens(input_ids)
        padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding = attention_mask.bool()
        mask = AttentionMask(attention_mode, padding, soft_mask_alpha, soft_mask_rank_reduction, packed)
        if attention_kernel(self.config.attention_backend, mask.effective_mode(l), x.device) == "flex":
            mask_args = mask.flex_arguments(b, l, x.device)
        else:
            mask_args = mask.sdpa_arguments(l, sdpa_dtype(x.dtype, x.device), x.device)
        rotary = rotary_tables(longest, self.config.head_dim, self.config.rope_theta, x.dtype, x.device)
        if packed is not None:
            rotary = tuple(table[packed.positions()] for table in rotary)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rotary, mask_args, use_reentrant=False)
            else:
                x = layer(x, rotary, mask_args)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class ConanWithHead(ConanPreTrainedModel):
    """A ConanModel under the `model.` prefix, the base of every head."""

    def __init__(self, config: ConanConfig):
        super().__init__(config)
        self.model = ConanModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table."""
        return self.model.embed_tokens


class ConanForCausalLM(ConanWithHead, GenerationMixin):
    """Decoder with a language-modelling head tied to the input embeddings."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Next-token logits; with labels (-100 = ignored), the mean shifted cross-entropy, fused with the head
        (lm_loss: no logits tensor is made for it). Training with labels returns no logits (as Liger-Kernel's fused
        heads do): the loss is what a training step needs, and the logits are its largest tensor."""
        hidden = self.model(input_ids, attention_mask, attention_mode="causal").last_hidden_state
        head = self.model.embed_tokens.weight
        loss = causal_lm_loss(hidden, head, labels) if labels is not None else None
        logits = None if self.training and loss is not None else F.linear(hidden, head)
        return CausalLMOutput(loss=loss, logits=logits)


class ConanForEmbedding(ConanWithHead):
    """Decoder with a pooling head producing L2-normalised, Matryoshka-truncatable sentence embeddings."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                attention_mode: AttentionMode = "bidirectional", soft_mask_alpha: float = 0.0,
                soft_mask_rank_reduction: bool = True, dim: int | None = None, raw: bool = False,
                documents: torch.Tensor | None = None, **_) -> torch.Tensor:
        """Unit-norm embeddings (batch, dim or hidden_size) pooled over non-padding tokens; with `documents`, one per
        text of the packed row input_ids (see ConanModel.forward).

        raw=True returns the pooled vectors before truncation and normalisation (for MRL losses).
        """
        if documents is not None:
            hidden = self.model(input_ids, None, attention_mode, soft_mask_alpha, soft_mask_rank_reduction,
                                documents=documents).last_hidden_state
            pooled = pool_packed(hidden[0].float(), documents, self.config.pooling)
            return pooled if raw else matryoshka_truncate(pooled, dim)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, attention_mask, attention_mode, soft_mask_alpha,
                            soft_mask_rank_reduction).last_hidden_state
        pooled = pool(hidden.float(), attention_mask, self.config.pooling)  # fp32 sums and scores under bf16
        return pooled if raw else matryoshka_truncate(pooled, dim)


def count_parameters(config: ConanConfig) -> int:
    """Number of parameters of the embedding model for `config`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = ConanModel(config)
    return sum(p.numel() for p in model.parameters())
