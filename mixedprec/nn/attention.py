"""Attention whose projections are modules, so that SBS, OPQ and ``pack`` can replace them.

``nn.MultiheadAttention`` keeps its input projection as a raw (3E, E) Parameter and reads
``out_proj.weight`` directly, so a quantized or packed projection module would never be called
(or, packed, would break it). ``LinearMultiheadAttention`` computes the same function with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` modules that it calls, and
``unfuse_attention`` puts one in place of every ``nn.MultiheadAttention`` of a model before the
methods convert its layers.

torch's transformer layers have fused fast paths that read the raw projection weights of their
attention and feed-forward layers instead of calling the modules. ``keep_off_fused_paths`` turns
the one that is an instance setting off (``nn.TransformerEncoder.use_nested_tensor``), and
``LinearMultiheadAttention._qkv_same_embed_dim`` is False, which sends
``nn.TransformerEncoderLayer`` down the path that calls its modules.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (same arguments, forward signature and results) with its four
    projections as called ``nn.Linear`` modules. Not supported: ``add_bias_kv``, ``add_zero_attn``."""

    _qkv_same_embed_dim = False  # keeps nn.TransformerEncoderLayer off its fused fast path (module doc)

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"LinearMultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias, **factory)

    @property
    def in_proj_bias(self) -> Tensor | None:
        """What nn.MultiheadAttention calls its input projection bias (read by torch's layers)."""
        return self.q_proj.bias

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> LinearMultiheadAttention:
        """The same attention with copies of ``mha``'s projection weights (out_proj's Parameters are shared)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("LinearMultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device="meta")
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        for proj, weight, bias in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            proj.weight = nn.Parameter(weight.clone(), ref.requires_grad)
            proj.bias = None if bias is None else nn.Parameter(bias.clone(), ref.requires_grad)
        new.out_proj.weight, new.out_proj.bias = mha.out_proj.weight, mha.out_proj.bias
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (its slow path, step by step: masks, scaling, dropout)."""
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the causal mask itself, applied by scaled_dot_product_attention
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            is_causal = is_causal and key_padding_mask is None
        if attn_mask is not None:  # (L, S) or (N * heads, L, S) -> broadcastable to (N, heads, L, S)
            attn_mask = attn_mask.reshape(1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else \
                attn_mask.reshape(bsz, heads, tgt_len, src_len)
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding

        q = self.q_proj(query).reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(bsz, src_len, heads, head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
            out = (F.dropout(weights, dropout) if dropout > 0 else weights) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def unfuse_attention(model: nn.Module) -> list[str]:
    """Replaces, in place, every ``nn.MultiheadAttention`` of ``model`` by its
    ``LinearMultiheadAttention``; returns their names. One it cannot replace (add_bias_kv,
    add_zero_attn) stays as it is, named in one warning, and its projections stay float."""
    replaced, kept = [], []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.MultiheadAttention:
            continue
        if module.bias_k is not None or module.add_zero_attn:
            kept.append(name)
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, LinearMultiheadAttention.from_float(module))
        replaced.append(name)
    if kept:
        warnings.warn(f"attention layers {kept} use add_bias_kv or add_zero_attn, which LinearMultiheadAttention "
                      f"does not support: their projections stay float", stacklevel=2)
    keep_off_fused_paths(model)
    return replaced


def keep_off_fused_paths(model: nn.Module) -> None:
    """Turns off nn.TransformerEncoder's nested-tensor fast path wherever it holds mixedprec
    modules: that path reads raw weights (``linear1.weight``, ``self_attn.in_proj_weight``)
    instead of calling the (quantized or packed) modules."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                type(m).__module__.startswith("mixedprec.") for m in module.modules()):
            module.use_nested_tensor = False
