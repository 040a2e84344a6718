"""Scaled dot-product attention, shared by CLIP, the VAE and the UNet.

    attention(q, k, v) = softmax(q k^T / sqrt(d)) v

PyTorch's fused `F.scaled_dot_product_attention` computes exactly this without materialising the
(T x T) score matrix, so it is faster and far lighter on memory at 64x64 latents (4096 tokens).
`USE_SDPA = False` switches to the plain formula, which is easier to step through and lets the
tests check that the fast path is honest.
"""
import math

import torch
import torch.nn.functional as F

USE_SDPA = True


def attention(q, k, v, causal=False):
    """q (B, heads, Tq, d), k and v (B, heads, Tk, d) -> (B, heads, Tq, d)."""
    if USE_SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, Tq, Tk)
    if causal:
        Tq, Tk = scores.shape[-2:]
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def split_heads(x, heads):
    """(B, T, C) -> (B, heads, T, C / heads)"""
    B, T, C = x.shape
    return x.view(B, T, heads, C // heads).transpose(1, 2)


def merge_heads(x):
    """(B, heads, T, d) -> (B, T, heads * d)"""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)
