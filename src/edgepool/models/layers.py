"""Transformer building blocks for the GPT, BERT and LLaMA families.

Each block holds its own attention and MLP as plain ``nn.Linear`` layers, so that TP can
slice them per device (``edgepool.models.tp``). Row-parallel output biases are separate
parameters, added once after the TP reduction.

Shapes: activations are ``[batch, tokens, hidden]``; under SP ``tokens`` is this
device's slice of the sequence and ``ctx.seq_offset`` its first position.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from edgepool.models.config import ModelConfig
from edgepool.models.parallel import SERIAL, ParallelCtx, sp_gather, tp_copy, tp_reduce


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, half-split layout (as in Hugging Face LLaMA). x: [b, t, h, d]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(positions.float(), inv)  # [t, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[None, :, None, :].to(x.dtype), emb.sin()[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, *, bias: bool, causal: bool, use_rope: bool):
        super().__init__()
        self.cfg, self.causal, self.use_rope = cfg, causal, use_rope
        h, d = cfg.hidden, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.kv_heads  # local counts under TP
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.o_bias = nn.Parameter(torch.zeros(h)) if bias else None
        self.ctx: ParallelCtx = SERIAL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, d = self.ctx, self.cfg.head_dim
        b, t, _ = x.shape
        x = tp_copy(x, ctx)
        q = self.q_proj(x).view(b, t, self.num_heads, d)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, d)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, d)
        q_pos = torch.arange(ctx.seq_offset, ctx.seq_offset + t)
        if self.use_rope:
            q, k = rope(q, q_pos, self.cfg.rope_theta), rope(k, q_pos, self.cfg.rope_theta)
        k, v = sp_gather(k, ctx), sp_gather(v, ctx)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, tokens, d]
        p = self.cfg.dropout if self.training else 0.0
        if self.causal and ctx.sp_group is not None:
            # Queries hold global positions q_pos; keys hold 0..T-1.
            mask = torch.arange(k.shape[2])[None, :] <= q_pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        y = self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * d))
        y = tp_reduce(y, ctx)
        return y if self.o_bias is None else y + self.o_bias


class MLP(nn.Module):
    """GELU MLP (GPT, BERT) or SwiGLU (LLaMA)."""

    def __init__(self, cfg: ModelConfig, *, gated: bool, bias: bool, approximate: str):
        super().__init__()
        self.gated, self.approximate = gated, approximate
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=bias)
        self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False) if gated else None
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=False)
        self.down_bias = nn.Parameter(torch.zeros(cfg.hidden)) if bias else None
        self.ctx: ParallelCtx = SERIAL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tp_copy(x, self.ctx)
        if self.gated:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x), approximate=self.approximate)
        y = tp_reduce(self.down(h), self.ctx)
        return y if self.down_bias is None else y + self.down_bias


class Block(nn.Module):
    """One Transformer block. ``post_norm`` is BERT's layout, else pre-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        fam = cfg.family
        self.post_norm = fam == "bert"
        norm = (lambda: RMSNorm(cfg.hidden, cfg.norm_eps)) if fam == "llama" else (lambda: nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(cfg, bias=fam != "llama", causal=fam != "bert", use_rope=fam == "llama")
        self.mlp = MLP(cfg, gated=fam == "llama", bias=fam != "llama", approximate="tanh" if fam == "gpt" else "none")
        self.drop = nn.Dropout(cfg.dropout)

    def set_ctx(self, ctx: ParallelCtx) -> None:
        self.attn.ctx = self.mlp.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.drop(self.attn(x)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Embedding(nn.Module):
    """Token (+ position, + token type and norm for BERT) embedding of full sequences."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.hidden) if cfg.family != "llama" else None
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden) if cfg.family == "bert" else None
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps) if cfg.family == "bert" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(ids.shape[1]))[None]
        if self.token_types is not None:
            x = x + self.token_types.weight[0]
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class Head(nn.Module):
    """Final norm and LM head (GPT, LLaMA) or the BERT MLM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.family == "bert":
            self.transform = nn.Linear(cfg.hidden, cfg.hidden)
            self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
            self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)
        else:
            self.transform = None
            self.norm = RMSNorm(cfg.hidden, cfg.norm_eps) if cfg.family == "llama" else nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
            self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = F.gelu(self.transform(x))
        return self.decoder(self.norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT-style init: normal(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
