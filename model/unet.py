"""The denoising UNet of Stable Diffusion v1, with SINE's optional position-map input.

    eps = unet(z_t, t, context, pos)

predicts the noise in the latent z_t at timestep t, given the text context. The UNet goes down
through four resolutions and back up, with skip connections between matching levels:

    input_blocks  (ResBlock [+ SpatialTransformer]) x2 per level, Downsample between levels
    middle_block  ResBlock, SpatialTransformer, ResBlock
    output_blocks (ResBlock [+ SpatialTransformer]) x3 per level, Upsample between levels

For SD v1 at 512 x 512 pixels (64 x 64 latents), 8 attention heads wherever there is attention:

    level   resolution   channels   attention   input_blocks   output_blocks
    0       64 x 64      320        yes         1, 2 (0: conv) 9, 10, 11
    1       32 x 32      640        yes         4, 5 (3 down)  6, 7, 8 (8 up)
    2       16 x 16      1280       yes         7, 8 (6 down)  3, 4, 5 (5 up)
    3       8 x 8        1280       no          10, 11 (9 down) 0, 1, 2 (2 up)
    middle  8 x 8        1280       yes

ResBlocks take the timestep embedding; SpatialTransformers cross-attend to the text context.

SINE gives the UNet the crop's position as "normalization and Fourier embedding" (Sec. 3.3), so
that a model fine-tuned on crops knows where each crop sat in the image. Where it enters is not in
the paper: the authors' code (UNetModelPatch) adds the fixed position map to the output of the very
first conv, and so do we. `pos=None` is plain SD v1.

Attribute names follow the checkpoint keys under `model.diffusion_model.`; the numbered blocks are
`nn.Sequential`-like lists whose indices match the file.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention, merge_heads, split_heads


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    num_heads: int = 8
    context_dim: int = 768


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 even under half precision, as SD v1 was trained."""

    def __init__(self, channels, eps=1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim), laid out as [cos, sin].

    SD v1's layout, which its trained time_embed weights expect; SINE's position map
    (sine.axis_embedding) puts sin first and spaces its frequencies slightly differently, as the
    authors' position code does. Each must match what its weights were trained with."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepBlock(nn.Sequential):
    """One numbered block of the UNet (input_blocks.N, middle_block, output_blocks.N): a Sequential
    whose layers take different extra inputs. ResBlocks get the timestep embedding, SpatialTransformers
    the text context, convs and resamplers neither. The name is the original code's."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # the timestep shifts every channel
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Self-attention when context is None, else queries from the image and keys/values from text."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)        # (B, heads, hw, d)
        k = split_heads(self.to_k(context), self.heads)  # (B, heads, 77, d) for cross-attention
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v)))


class GEGLU(nn.Module):
    """One projection to 2 x inner, split into value and gate: value * gelu(gate)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # value first: the order in the checkpoint
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)           # self-attention over pixels
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)   # cross-attention to the prompt
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treats each latent pixel as a token: (B, C, h, w) -> (B, hw, C) -> transformer -> back."""

    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.norm = GroupNorm32(channels, eps=1e-6)  # note: 1e-6 here, unlike the ResBlocks
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, hw, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        mc, emb = cfg.model_channels, 4 * cfg.model_channels
        widths = [mc * m for m in cfg.channel_mult]

        def res_and_attn(level, cin, cout):
            layers = [ResBlock(cin, cout, emb)]
            if level in cfg.attention_levels:
                layers.append(SpatialTransformer(cout, cfg.context_dim, cfg.num_heads))
            return layers

        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        # Going down, remember each block's width: the way up concatenates them as skips.
        self.input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_widths, ch = [mc], mc
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepBlock(*res_and_attn(level, ch, width)))
                ch = width
                skip_widths.append(ch)
            if level < len(widths) - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                skip_widths.append(ch)

        self.middle_block = TimestepBlock(ResBlock(ch, ch, emb),
                                          SpatialTransformer(ch, cfg.context_dim, cfg.num_heads),
                                          ResBlock(ch, ch, emb))

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(cfg.num_res_blocks + 1):
                layers = res_and_attn(level, ch + skip_widths.pop(), width)
                ch = width
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        # Training trades compute for memory: keep only block inputs, recompute the rest in backward.
        self.gradient_checkpointing = False

    def run(self, block, h, emb, context):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(self, x, t, context, pos=None):
        """x (B, 4, h, w), t (B,) integer timesteps, context (B, 77, 768),
        pos: SINE's position map already resized to (h, w), (B or 1, model_channels, h, w)."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # (B, 1280)
        h = self.input_blocks[0](x, emb, context)                                 # (B, 320, h, w)
        if pos is not None:
            h = h + pos.to(h.dtype)  # as the authors' code: before it is stored as the first skip
        skips = [h]
        for block in self.input_blocks[1:]:
            h = self.run(block, h, emb, context)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
