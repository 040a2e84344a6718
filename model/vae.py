"""The KL autoencoder ("VAE") of Stable Diffusion v1: 8x compression between pixels and latents.

The diffusion model never sees pixels. The encoder maps an image (B, 3, H, W) in [-1, 1] to a
Gaussian over latents (B, 4, H/8, W/8); the decoder maps latents back to pixels.

The latents that the UNet works on are a draw from the encoder's Gaussian times LATENT_SCALE =
0.18215 (chosen by the SD authors so that the latents have unit variance): fine-tuning samples it,
as SD's and SINE's authors train (`sine.encode`); its mean is the same latent without the small
noise the encoder predicts. We keep that multiplication
out of this file on purpose: `encode` and `decode` work on *unscaled* latents, and the caller
scales them where a reader can see it.

Two things make the VAE safe and affordable at any size (see "Precision and tiling" at the end):
it always computes in fp32, even inside a half-precision autocast region, and it can work on
large images in overlapping tiles.

Attribute names follow the checkpoint keys under `first_stage_model.`.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

LATENT_SCALE = 0.18215


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)  # one level per entry; every level but the last halves H and W
    num_res_blocks: int = 2
    z_channels: int = 4

    @property
    def factor(self):
        """Pixels per latent pixel, along each side: 8 for SD v1."""
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # the VAE's GroupNorms all use eps 1e-6


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v are 1x1 convs in the checkpoint."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # contiguous: SDPA's fused kernels, which never hold the (HW, HW) scores, take no strided q, k, v
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None].contiguous() for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Asymmetric: pad only right and bottom, then a stride-2 conv without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution: a few ResnetBlocks, then (except at one end) a Downsample or an Upsample."""

    def __init__(self, in_channels, out_channels, num_blocks, resample=None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks))
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([cfg.ch] + widths)[i], w, cfg.num_res_blocks, "down" if i < last else None)
            for i, w in enumerate(widths))
        self.mid = Mid(widths[-1])
        self.norm_out = Normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # Stored in the checkpoint from high to low resolution (up.0 is the last to run), so we
        # build the list in that order and run it reversed.
        self.up = nn.ModuleList(
            Level((widths[1:] + widths[-1:])[i], w, cfg.num_res_blocks + 1, "up" if i > 0 else None)
            for i, w in enumerate(widths))
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, images, tiled=False):
        """images (B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, 4, H/8, W/8), unscaled, fp32.

        tiled: True encodes in overlapping tiles (H and W multiples of 8), None does so only above
        AUTO_TILE_PIXELS, False never."""
        with full_precision(images) as images:
            moments = lambda x: self.quant_conv(self.encoder(x))  # (B, 8, H/8, W/8)
            if use_tiles(tiled, images.shape[-2] * images.shape[-1]):
                moments = tile_apply(moments, images, 8 * TILE, 8 * OVERLAP, scale=1 / 8)
            else:
                moments = moments(images)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents, tiled=False):
        """unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1], fp32.

        tiled: True decodes in overlapping tiles, None does so only above AUTO_TILE_PIXELS, False never."""
        with full_precision(latents) as latents:
            pixels = lambda z: self.decoder(self.post_quant_conv(z))
            if use_tiles(tiled, 64 * latents.shape[-2] * latents.shape[-1]):
                return tile_apply(pixels, latents, TILE, OVERLAP, scale=8)
            return pixels(latents)


# ---------------------------------------------------------------------------------------------
# Precision and tiling
#
# Half precision. The decoder's activations grow to tens of thousands in the last levels, beyond
# fp16's largest number (65504): in fp16 they overflow to inf, and the next GroupNorm turns inf into
# NaN, a black image. So the VAE ignores any autocast region around it and computes in fp32 (it is
# 84 M parameters, and runs once per image: the cost is small). load_sd keeps its weights fp32.
#
# Tiling. Memory grows with the image: at 2048 x 2048 one 128-channel feature map of the decoder is
# 2 GB, and a ResnetBlock holds several. Working on overlapping tiles of at most TILE x TILE latent
# pixels (512 x 512 image pixels) bounds that, and blending neighbouring tiles linearly across their
# overlap hides the seams. Tiling is not exact: each tile's GroupNorms normalise with that tile's own
# statistics and the mid-block attention sees only its tile, so colours drift slightly from the
# untiled result (tests/test_fastpaths.py and BENCHMARKS.md give the sizes measured).

TILE = 64                        # latent pixels per tile side (512 image pixels, SD v1's training size)
OVERLAP = 16                     # least overlap of neighbouring tiles, in latent pixels
AUTO_TILE_PIXELS = 1024 * 1024   # tiled=None tiles images with more pixels than this


@contextmanager
def full_precision(x):
    """`with full_precision(x) as x:` any autocast switched off, and x cast to fp32."""
    with torch.autocast(x.device.type, enabled=False):
        yield x.float()


def use_tiles(tiled, image_pixels):
    return image_pixels > AUTO_TILE_PIXELS if tiled is None else tiled


def tile_starts(size, tile, overlap, multiple=1):
    """Offsets of the fewest tiles that cover `size` with at least `overlap` shared between
    neighbours, spread evenly, each a multiple of `multiple`."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1) / multiple) * multiple for i in range(n)]


def blend_weights(starts, tile, scale, device):
    """One weight vector per tile along an axis, in output pixels: rising linearly across the part
    it shares with the previous tile, falling across the part it shares with the next."""
    weights = []
    for k, start in enumerate(starts):
        before = starts[k - 1] + tile - start if k > 0 else 0
        after = start + tile - starts[k + 1] if k + 1 < len(starts) else 0
        i = torch.arange(round(tile * scale), device=device) + 0.5
        w = torch.ones_like(i)
        if before:
            w = torch.minimum(w, i / (before * scale))
        if after:
            w = torch.minimum(w, (len(i) - i) / (after * scale))
        weights.append(w)
    return weights


def tile_apply(fn, x, tile, overlap, scale):
    """fn(x), for a convolutional fn from (B, C, H, W) to (B, C', H * scale, W * scale), computed on
    overlapping tiles of x; each output pixel is the weighted mean of the tiles that cover it.
    tile and overlap are in input pixels."""
    B, _, H, W = x.shape
    multiple = round(1 / scale) if scale < 1 else 1  # tile offsets must land on whole output pixels
    if H % multiple or W % multiple:
        raise ValueError(f"tiled encoding needs a height and width divisible by {multiple}, got {H}x{W}")
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, overlap, multiple), tile_starts(W, tw, overlap, multiple)
    wys, wxs = blend_weights(ys, th, scale, x.device), blend_weights(xs, tw, scale, x.device)
    out = total = None
    for y, wy in zip(ys, wys):
        for x0, wx in zip(xs, wxs):
            piece = fn(x[:, :, y:y + th, x0:x0 + tw]).float()
            if out is None:  # fn tells us its output channels
                out = torch.zeros(B, piece.shape[1], round(H * scale), round(W * scale), device=x.device)
                total = torch.zeros(out.shape[-2:], device=x.device)
            w = wy[:, None] * wx[None, :]
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy:oy + len(wy), ox:ox + len(wx)] += piece * w
            total[oy:oy + len(wy), ox:ox + len(wx)] += w
    return out / total
