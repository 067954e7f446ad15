"""Grouped-query self-attention with rotary positions and three mask modes: causal, bidirectional, soft.

The mask is described once per forward pass by `AttentionMask` and shared by every layer. Two
kernels implement it: PyTorch SDPA with a boolean or float bias, and FlexAttention with
`score_mod`/`mask_mod` so the soft mask never materialises an (l, l) tensor. Sequences are
right-padded (the tokenizer pads on the right), so every query row keeps at least one key. A packed
row (batch 1, several texts back to back, no padding) names each token's document: a token attends
only within its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import ConanConfig
from .soft_mask import is_fully_open, soft_mask_bias, soft_mask_score_mod

AttentionMode = Literal["causal", "bidirectional", "soft"]
ATTENTION_MODES: tuple[str, ...] = ("causal", "bidirectional", "soft")


def flex_attention_available() -> bool:
    """True where torch ships FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def flex_kernel(device_type: str):
    """FlexAttention compiled into a fused kernel on accelerators; the eager reference on CPU. Compiled with torch's
    automatic dynamic shapes: batches come padded to many lengths, and a kernel compiled per length (dynamic=False)
    recompiled at each new one until torch's recompile limit (8) sent it to the slow eager path (H200, 6 lengths:
    39.8 s of soft-mask steps against 15.6 s)."""
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention if device_type == "cpu" else torch.compile(flex_attention)


def attention_kernel(backend: str, mode: AttentionMode, device: torch.device) -> str:
    """The kernel for a forward pass: the configured one, or for 'auto' compiled FlexAttention when the soft mask runs
    on CUDA (its bias computed in the kernel: no (l, l) tensor, no unfused SDPA path) and SDPA otherwise (flash for
    causal and bidirectional; on CPU and NPU eager FlexAttention is the slower reference)."""
    if backend != "auto":
        return backend
    return "flex" if mode == "soft" and device.type == "cuda" else "sdpa"


def sdpa_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype SDPA runs in: fp32 for a bf16 model on CPU (PyTorch's CPU flash kernel is 2-3× slower in bf16 than in
    fp32 at these head sizes, masked or not), else the model's."""
    return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype


# One more attention call per layer costs about as much as attending this many text × token² more (estimated for SDPA
# on CPU at 6 × 384: ~150 µs a call, ~70 ns a text × token²); it sets how finely a packed row's texts are grouped
# (512 to 8192 ran the serving bench's passes alike).
GROUP_CALL_COST = 2048


@dataclass(frozen=True)
class PackedRow:
    """Texts back to back in one unpadded row: each token's text (0, 1, … in order), each text's size and first
    token, the longest, and the texts grouped by like lengths for attention (`length_groups`)."""

    documents: torch.Tensor  # (length,)
    sizes: torch.Tensor  # (texts,)
    starts: torch.Tensor  # (texts,)
    longest: int
    groups: tuple[torch.Tensor, ...]  # text numbers, ascending, of each group

    @classmethod
    def of(cls, documents: torch.Tensor) -> "PackedRow":
        """The row's layout; ValueError unless the texts are numbered 0, 1, … in row order, each with a token."""
        sizes = torch.bincount(documents)
        if not bool((documents.diff() >= 0).all()) or not bool((sizes > 0).all()):
            raise ValueError("documents must number a packed row's texts 0, 1, … in row order, each with a token")
        groups = tuple(torch.tensor(g, device=documents.device) for g in length_groups(sizes.tolist()))
        return cls(documents, sizes, sizes.cumsum(0) - sizes, int(sizes.max()), groups)

    def positions(self) -> torch.Tensor:
        """Each token's position in its own text (rotary positions restart at every text)."""
        return torch.arange(len(self.documents), device=self.documents.device) - self.starts[self.documents]


def pack_texts(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists back to back as one unpadded row (1, tokens) and each token's text number (`documents`), the
    input of a packed forward pass (ConanModel.forward)."""
    row = torch.tensor([[token for text in sequences for token in text]], dtype=torch.long)
    documents = torch.repeat_interleave(torch.arange(len(sequences)), torch.tensor([len(s) for s in sequences]))
    return row, documents


def length_groups(sizes: list[int], call_cost: int | None = None) -> list[list[int]]:
    """The texts (numbers into `sizes`, ascending in each group) split into groups of like lengths, each attended
    padded to its own longest: of the splits of the texts sorted by size, the one that minimises
    Σ texts × longest² + call_cost (default GROUP_CALL_COST) per group (dynamic programming over the distinct sizes,
    quadratic in their number: a server's pass holds tens of texts)."""
    call_cost = GROUP_CALL_COST if call_cost is None else call_cost
    order = sorted(range(len(sizes)), key=sizes.__getitem__)
    ordered = [sizes[i] for i in order]
    cuts = [0] + [i for i in range(1, len(ordered)) if ordered[i] != ordered[i - 1]] + [len(ordered)]
    best, back = [0.0] + [float("inf")] * (len(cuts) - 1), [0] * len(cuts)
    for j in range(1, len(cuts)):
        longest = ordered[cuts[j] - 1] ** 2
        for i in range(j):
            cost = best[i] + (cuts[j] - cuts[i]) * longest + call_cost
            if cost < best[j]:
                best[j], back[j] = cost, i
    groups, j = [], len(cuts) - 1
    while j > 0:
        groups.append(sorted(order[cuts[back[j]]:cuts[j]]))
        j = back[j]
    return groups[::-1]


@dataclass(frozen=True)
class PackedAttention:
    """A packed row laid out for SDPA, per group of like lengths: (index of each text's tokens in the row (texts,
    longest), which of them are real, the group's mask (boolean, or the soft mask's additive bias) or None), and the
    permutation that puts the groups' real tokens back in row order (None when they already are)."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    inverse: torch.Tensor | None


@dataclass
class AttentionMask:
    """Everything a layer needs to mask attention for one batch; built once per forward pass."""

    mode: AttentionMode
    padding: torch.Tensor | None  # (batch, length) bool, True = real token; None = no padding
    alpha: float = 0.0
    rank_reduction: bool = True
    packed: PackedRow | None = None  # one packed row (batch 1) instead of a padded batch

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.mode == "soft" and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"soft-mask alpha must lie in [0, 1], got {self.alpha}")

    def soft_length(self, length: int) -> int:
        """eq. 4's l for a pass of `length` tokens a row: a packed row's longest text, the length its texts padded
        into a batch would have, so a packed pass weights attention exactly as the padded one."""
        return self.packed.longest if self.packed is not None else length

    def effective_mode(self, length: int) -> AttentionMode:
        """The mode to run: a soft mask whose every entry is 1 is plain bidirectional attention."""
        if self.mode == "soft" and is_fully_open(self.soft_length(length), self.alpha, self.rank_reduction):
            return "bidirectional"
        return self.mode

    def sdpa_arguments(self, length: int, dtype: torch.dtype, device: torch.device) -> dict:
        """attn_mask / is_causal for F.scaled_dot_product_attention."""
        mode = self.effective_mode(length)
        if self.packed is not None:
            return self._packed_sdpa_arguments(mode, dtype, device)
        keys = None if self.padding is None else self.padding[:, None, None, :]  # (b, 1, 1, l)
        if mode == "bidirectional":
            return {"attn_mask": keys, "is_causal": False}
        if mode == "causal":
            if keys is None:
                return {"attn_mask": None, "is_causal": True}
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            return {"attn_mask": causal & keys, "is_causal": False}
        bias = soft_mask_bias(length, self.alpha, self.rank_reduction, dtype, device)
        if keys is not None:
            bias = bias.masked_fill(~keys, float("-inf"))  # (b, 1, l, l), shared by all heads
        return {"attn_mask": bias, "is_causal": False}

    def _packed_sdpa_arguments(self, mode: AttentionMode, dtype: torch.dtype, device: torch.device) -> dict:
        """A packed row's texts laid out as padded batches for attention alone, one per group of like lengths.
        Attending per text costs texts × longest² (each group's own longest), where one (l, l) document mask would
        cost the whole row's l²; the projections and the MLP see no padding. Under the soft mask a group of longest g
        takes the top-left g × g of the row's bias (its rows depend only on the query's position and l)."""
        groups, rows = [], []
        bias = (soft_mask_bias(self.packed.longest, self.alpha, self.rank_reduction, dtype, device)
                if mode == "soft" else None)
        for texts in self.packed.groups:
            sizes = self.packed.sizes[texts]
            offsets = torch.arange(int(sizes.max()), device=device)
            real = offsets[None, :] < sizes[:, None]
            index = torch.where(real, self.packed.starts[texts][:, None] + offsets[None, :], 0)
            keys = real[:, None, None, :]
            if mode == "causal":
                keys = keys & torch.ones(len(offsets), len(offsets), dtype=torch.bool, device=device).tril()
            if bias is not None:  # the soft bias always applies; padded keys on top of it
                square = bias[:len(offsets), :len(offsets)]
                mask = square.expand(1, 1, -1, -1) if bool(real.all()) else square.masked_fill(~keys, float("-inf"))
            else:
                mask = None if bool(keys.all()) else keys
            groups.append((index, real, mask))
            rows.append(index[real])
        order = torch.cat(rows)
        in_order = bool((order.diff() > 0).all())
        return {"attn_mask": None, "is_causal": False,
                "packed": PackedAttention(groups, None if in_order else torch.argsort(order))}

    def flex_arguments(self, batch: int, length: int, device: torch.device) -> dict:
        """score_mod / block_mask for FlexAttention; the soft bias is computed on the fly."""
        from torch.nn.attention.flex_attention import create_block_mask

        mode = self.effective_mode(length)
        padding = self.padding
        documents = self.packed.documents if self.packed is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            keep = padding[b, kv_idx] if padding is not None else kv_idx >= 0
            if documents is not None:
                keep = keep & (documents[q_idx] == documents[kv_idx])
            return keep & (q_idx >= kv_idx) if mode == "causal" else keep

        needs_mask = padding is not None or self.packed is not None or mode == "causal"
        # Compiled on accelerators: eager, building the block mask is tens of small kernels every forward pass.
        block_mask = (create_block_mask(mask_mod, batch if padding is not None else None, None, length, length,
                                        device=device, _compile=device.type != "cpu") if needs_mask else None)
        score_mod = (soft_mask_score_mod(self.soft_length(length), self.alpha, self.rank_reduction, device,
                                         None if self.packed is None else self.packed.positions())
                     if mode == "soft" else None)
        return {"score_mod": score_mod, "block_mask": block_mask}


def rotary_tables(length: int, head_dim: int, theta: float, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotary position embeddings for positions 0..length-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, length, head_dim) by the rotary tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ConanAttention(nn.Module):
    """Multi-head self-attention with grouped key/value heads (GQA)."""

    def __init__(self, config: ConanConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask_args: dict) -> torch.Tensor:
        """Attend over x (batch, length, hidden) with precomputed rotary tables and mask arguments."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if "block_mask" in mask_args:  # FlexAttention's arguments: attention_kernel chose it for this pass
            out = flex_kernel(q.device.type)(q, k, v, enable_gqa=True, **mask_args)
        else:
            dtype = sdpa_dtype(q.dtype, q.device)
            packed = mask_args.get("packed")
            if packed is not None:  # one packed row: per group of like lengths, its texts side by side, padded
                parts = []
                for index, real, keys in packed.groups:
                    group = (t[0][:, index].transpose(0, 1).to(dtype) for t in (q, k, v))  # (texts, heads, longest, d)
                    out = F.scaled_dot_product_attention(*group, enable_gqa=True, attn_mask=keys)
                    parts.append(out.transpose(0, 1)[:, real])  # its real tokens: (heads, tokens, d)
                out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                out = (out if packed.inverse is None else out[:, packed.inverse])[None].to(x.dtype)  # (1, heads, l, d)
            else:
                out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), enable_gqa=True,
                                                     attn_mask=mask_args["attn_mask"],
                                                     is_causal=mask_args["is_causal"]).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))
