"""SINE: SINgle image Editing with text-to-image diffusion models (Zhang et al., arXiv 2212.04489).

The method, top to bottom. Stable Diffusion v1 itself lives in model/.

  1. Prompts: `[*]` marks the thing being learned.
  2. The position map (Sec. 3.3): where in the image a crop came from.
  3. Patch-based fine-tuning (Sec. 3.3): random crops, what learns, the loss of one training step
     (train.py's loop adds backward and AdamW's step).
  4. Model-based classifier-free guidance (Sec. 3.2, Eq. 2 and 3) and the sampler.

What is not the method lives elsewhere: the fine-tuned file's format in finetuned_file.py, reading
photos and the speed switches in cli.py, AdamW's memory-saving update during backward in adamw.py.

Numbers that the paper leaves open come from the authors' code; SOURCES.md says, choice by choice,
what the paper says, what the authors' code does and what we do.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from model import LATENT_SCALE
from model.ddim import classifier_free_guidance, sample
from model.schedule import NUM_TRAIN_TIMESTEPS, add_noise, predict_x0

# ---------------------------------------------------------------------------------------------
# 1. Prompts

PLACEHOLDER = "[*]"
IDENTIFIER = "sks"  # the rare token that the authors' code (after DreamBooth) puts for [*]


def training_prompt(prompt):
    """'a photo of a [*] castle' -> 'a photo of a sks castle'"""
    if PLACEHOLDER not in prompt:
        raise ValueError(f'the training prompt needs the identifier {PLACEHOLDER}, e.g. "a photo of a [*] castle"')
    return prompt.replace(PLACEHOLDER, IDENTIFIER)


def target_prompt(target, prompt):
    """'... covered by snow' -> 'a photo of a castle covered by snow' (the training prompt without [*]).

    A typographic ellipsis, '…', as phones and word processors type it, counts as '...'."""
    for ellipsis in ("...", "\u2026"):
        if target.startswith(ellipsis):
            return " ".join(prompt.replace(PLACEHOLDER, " ").split() + target[len(ellipsis):].split())
    return target


# ---------------------------------------------------------------------------------------------
# 2. The position map (Sec. 3.3)
#
# Fine-tuning sees random crops of one image. Without help the model would learn "castle at the
# centre of every 512 x 512 view", and at sampling time paint a castle in every window. SINE adds a
# fixed sinusoidal map of (x, y) positions to the UNet's first feature map, so each crop is told
# where it came from; at sampling time the whole map, stretched to any H x W, lays out the scene.
# The paper says only "normalization and Fourier embedding" of the crop box. The map's form below
# (a fixed 2-D sinusoid, half the channels per axis, cut and resized bilinearly) and where it enters
# the UNet come from the authors' code (UNetModelPatch).


@dataclass(frozen=True)
class Sizes:
    """SINE's sizes follow the base model. Every crop is resized to the base's native resolution,
    and the canvas the crops are cut from is twice that: 512 and 1024 for SD v1. The position map
    has one cell per latent pixel of the canvas: 128 x 128 cells of 8 pixels for SD v1. The paper
    crops the image itself; the square canvas, twice the crop, is the authors' code's."""
    crop: int = 512   # pixels a side: the base's native resolution
    cell: int = 8     # pixels per latent pixel, the VAE's factor

    @property
    def canvas(self):
        return 2 * self.crop

    @property
    def grid(self):
        return self.canvas // self.cell


SD_V1 = Sizes()


def sizes_for(config):
    """The sizes for a base model's SDConfig."""
    return Sizes(crop=config.image_size, cell=config.vae.factor)


def axis_embedding(positions, dim):
    """positions (N,) -> (dim, N): [sin(p w_i), cos(p w_i)] with dim/2 frequencies from 1 to 1/10000."""
    n = dim // 2
    freqs = torch.exp(-torch.arange(n, dtype=torch.float32) * math.log(10000.0) / (n - 1))
    angles = positions.float()[:, None] * freqs[None]                    # (N, n)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).T   # (dim, N)


def position_map(channels, rows=None, cols=None, sizes=SD_V1):
    """The map at grid rows x cols (1-based positions; default the whole grid): (channels, R, C).

    The first half of the channels varies along the width (x), the second half along the height (y).
    """
    rows = torch.arange(1, sizes.grid + 1) if rows is None else rows
    cols = torch.arange(1, sizes.grid + 1) if cols is None else cols
    x = axis_embedding(cols, channels // 2)[:, None, :].expand(-1, len(rows), -1)
    y = axis_embedding(rows, channels // 2)[:, :, None].expand(-1, -1, len(cols))
    return torch.cat([x, y], dim=0)


def crop_position_map(full_map, crop_box, size):
    """Cut crop_box = [y0, x0, y1, x1] (grid cells) out of the map and resize it to size = (h, w)."""
    y0, x0, y1, x1 = crop_box
    region = full_map[None, :, y0:y1, x0:x1]
    return F.interpolate(region, size=tuple(size), mode="bilinear", align_corners=True)  # (1, C, h, w)


# ---------------------------------------------------------------------------------------------
# 3. Patch-based fine-tuning (Sec. 3.3)

def to_tensor(image, size):
    """PIL image -> (1, 3, h, w) in [-1, 1], resized to size = (h, w) without keeping the aspect.

    PIL's bicubic filter and 8-bit rounding, as the authors' data loader does for the canvas and
    for every crop."""
    image = image.resize((size[1], size[0]), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return (pixels.view(size[0], size[1], 3).permute(2, 0, 1)[None].float() / 127.5 - 1.0)


def make_canvas(image, sizes=SD_V1):
    """The photo resized to the square canvas (bicubic): the aspect is not kept, the position map
    restores it at sampling time. Stays a PIL image, so that each crop is resampled from 8-bit pixels."""
    return image.resize((sizes.canvas, sizes.canvas), Image.BICUBIC)


def sample_crop_box(generator, sizes=SD_V1):
    """Crop height and width drawn independently from [0.1, 1) of the grid, at a random offset.

    The fractions are the paper's (Sec. 4); drawing them in whole cells of 8 pixels is the authors':
    12 to 127 of SD v1's 128 cells."""
    grid = sizes.grid
    h, w = (int(grid * (0.1 + 0.9 * torch.rand((), generator=generator).item())) for _ in range(2))
    y0 = int(torch.randint(0, grid - h + 1, (), generator=generator))
    x0 = int(torch.randint(0, grid - w + 1, (), generator=generator))
    return [y0, x0, y0 + h, x0 + w]


def crop_pixels(canvas, crop_box, sizes=SD_V1):
    """The canvas region of crop_box (grid cells), resized to the crop size: (1, 3, 512, 512) for SD v1."""
    y0, x0, y1, x1 = (sizes.cell * c for c in crop_box)
    return to_tensor(canvas.crop((x0, y0, x1, y1)), (sizes.crop, sizes.crop))


@torch.no_grad()
def encode(vae, pixels, generator):
    """pixels in [-1, 1] -> a latent sampled from the VAE's Gaussian, as the authors' code does
    (not its mean), scaled as the UNet expects."""
    mean, logvar = vae.encode(pixels.to(next(vae.parameters()).device))
    noise = torch.randn(mean.shape, generator=generator).to(mean)
    return LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * noise)


def reconstruction_loss(x0_pred, z0, t):
    """The authors' reconstruction term (not in the paper): mean_b[(t/1000)^2 * mean_{c,h,w} |x0_pred - z0|].

    A per-pixel L1 on the whole clean latent predicted from the noise, x0_pred. The authors' code
    first pools both latents to 64 x 64 (adaptive_avg_pool2d, recon_loss_size = 64), which on the
    64 x 64 latent of a 512 x 512 crop changes nothing. The weight (t/1000)^2 leaves nearly clean
    steps to the eps-MSE; at large t the term dominates, since x0_pred's error is eps's error times
    sqrt((1 - a_t) / a_t), 11.0 at t = 950 with SD's schedule: it makes the model lay out each crop
    from heavy noise.
    """
    per_sample = (x0_pred - z0).abs().mean(dim=(1, 2, 3))                       # (B,)
    return ((t.float() / NUM_TRAIN_TIMESTEPS) ** 2 * per_sample).mean()


def training_loss(unet, z0, context, t, noise, alphas_cumprod, position=None, recon_weight=1.0):
    """epsilon-MSE (the usual diffusion loss) + recon_weight * the reconstruction term."""
    z_t = add_noise(z0, noise, t, alphas_cumprod)
    eps_pred = unet(z_t, t, context, position)
    loss = F.mse_loss(eps_pred.float(), noise.float())
    if recon_weight:
        x0_pred = predict_x0(z_t, eps_pred.float(), t, alphas_cumprod)
        loss = loss + recon_weight * reconstruction_loss(x0_pred, z0.float(), t)
    return loss


@dataclass
class Example:
    """What one fine-tuning step trains on."""
    z0: torch.Tensor                 # (1, 4, 64, 64) latent of the crop
    position: torch.Tensor | None    # (1, C, 64, 64) position map of the crop, None without patches


def sample_example(vae, canvas, patch, generator, full_map=None, sizes=SD_V1):
    """Patch mode: a random crop of the canvas and its position map. Otherwise: the whole image."""
    if not patch:
        return Example(encode(vae, crop_pixels(canvas, [0, 0, sizes.grid, sizes.grid], sizes), generator), None)
    crop_box = sample_crop_box(generator, sizes)
    z0 = encode(vae, crop_pixels(canvas, crop_box, sizes), generator)
    return Example(z0, crop_position_map(full_map, crop_box, z0.shape[-2:]).to(z0))


def trainable_parts(sd):
    """What fine-tuning changes: the UNet and the text encoder, as in the authors' code; the VAE stays frozen."""
    return {"unet": sd.unet, "text_encoder": sd.text_encoder}


def step_loss(sd, canvas, ids, patch, generator, alphas_cumprod, full_map=None, autocast=None, sizes=SD_V1, batch=1):
    """The loss of one fine-tuning step, on `batch` random crops (the paper's batch is one), each
    noised at its own random t; with patch=False, the whole image without a position map and
    without the reconstruction term. Returns (loss, t); train.py's loop runs backward and AdamW."""
    examples = [sample_example(sd.vae, canvas, patch, generator, full_map, sizes) for _ in range(batch)]
    z0 = torch.cat([e.z0 for e in examples])                                     # (batch, 4, 64, 64)
    position = None if examples[0].position is None else torch.cat([e.position for e in examples])
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0)
    with autocast or torch.autocast(z0.device.type, enabled=False):
        context = sd.text_encoder(ids).expand(batch, -1, -1)                     # one prompt for every crop
        loss = training_loss(sd.unet, z0, context, t, noise, alphas_cumprod, position,
                             recon_weight=1.0 if patch else 0.0)
    return loss, t


# ---------------------------------------------------------------------------------------------
# 4. Model-based classifier-free guidance (Sec. 3.2) and sampling
#
# Plain classifier-free guidance (Eq. 2) steers the pre-trained model towards the target prompt c
# (the paper writes w * eps_pre(z, c) + (1 - w) * eps_pre(z, ""), the same sum):
#     eps = eps_pre(z, "") + w * (eps_pre(z, c) - eps_pre(z, ""))
# SINE (Eq. 3) also lets the fine-tuned model, which knows the photo, pull towards it:
#     eps = eps_pre(z, "") + w * (v * eps_pre(z, c) + (1 - v) * eps_ft(z, c_hat) - eps_pre(z, ""))
# but only while t > K: early steps lay out structure, which should come from the photo; the steps
# with t <= K are left to the pre-trained model, which knows how a "castle covered by snow" looks.
# K is a timestep on the 1000-step training scale, not a count of sampler steps: with 50 DDIM
# steps (t = 981, 961, ..., 1) and K = 400, the first 30 steps are guided and the last 20 are not.
# Several fine-tuned models can guide together (Sec. 4.4, style transfer). The paper gives no
# weights for that; the authors' code gives model i the weight b_i = 1 - v_i, and the pre-trained
# model keeps 1 - sum(b_i).

@dataclass
class Guide:
    """One fine-tuned model guiding the sampler."""
    unet: torch.nn.Module
    context: torch.Tensor             # (1, 77, 768) its training prompt c_hat, by its own text encoder
    position: torch.Tensor | None     # (1, C, h, w) the whole position map at the output size
    v: float = 0.7                    # share kept by the pre-trained model's prediction
    K: int = 400                      # guide only while t > K


def sine_eps(base_unet, cond, uncond, guides, scale, each_alone=None):
    """eps_fn(z, t) for model.ddim.sample: Eq. 3 while some guide is active (t > K), else Eq. 2.

    A guided step costs 2 + (active guides) UNet evaluations: the fine-tuned model needs no
    unconditional pass (the authors' code ran one and threw it away). One sample at a time:
    z is (1, 4, h, w) and cond, uncond are (1, 77, 768).

    each_alone(z, t, eps_alone), if given, shows Eq. 3's tug of war at every guided step. eps_alone
    holds what each model asks for on its own: the pre-trained model with the target (Eq. 2), then
    each guide with its prompt and all the weight (Eq. 3 at v = 0; None while it is inactive).
    Eq. 3's eps is their mix, with weights 1 - sum(b_i) and b_i.
    """
    both = torch.cat([cond, uncond])

    def eps_fn(z, t):
        batch_t = torch.full((2,), t, dtype=torch.long, device=z.device)
        # .float(): under bf16 autocast the UNet answers in bf16; the guidance arithmetic below
        # amplifies differences by w = 7.5, so it runs in fp32.
        eps_cond, eps_uncond = base_unet(torch.cat([z, z]), batch_t, both).float().chunk(2)
        active = [g for g in guides if t > g.K]
        if not active:
            return classifier_free_guidance(eps_uncond, eps_cond, scale)        # Eq. 2
        eps_finetuned = [g.unet(z, batch_t[:1], g.context, g.position).float() if t > g.K else None
                         for g in guides]                                       # None: inactive
        mixed = (1 - sum(1 - g.v for g in active)) * eps_cond
        for g, eps_ft in zip(guides, eps_finetuned):
            if eps_ft is not None:
                mixed = mixed + (1 - g.v) * eps_ft
        if each_alone is not None:
            each_alone(z, t, [None if e is None else classifier_free_guidance(eps_uncond, e, scale)
                              for e in [eps_cond, *eps_finetuned]])
        return classifier_free_guidance(eps_uncond, mixed, scale)               # Eq. 3

    return eps_fn


@torch.no_grad()
def edit(sd, guides, cond, uncond, noise, scale=7.5, steps=50, eta=0.0, generator=None, progress=True,
         autocast=None, tiled=None, callback=None, each_alone=None):
    """Sample an edited latent from noise (1, 4, h, w) and decode it: (1, 3, 8h, 8w) in [-1, 1].

    autocast: e.g. torch.autocast("cuda", torch.bfloat16) for the UNet passes (the VAE always runs
    in fp32); tiled: decode in tiles, True, False or None (only large images, see model/vae.py);
    callback(t, x0_hat): see model.ddim.sample; each_alone: see sine_eps."""
    with autocast or torch.autocast(noise.device.type, enabled=False):
        latents = sample(sine_eps(sd.unet, cond, uncond, guides, scale, each_alone), noise, steps, eta, generator,
                         progress, callback)
    return sd.vae.decode(latents / LATENT_SCALE, tiled=tiled).clamp(-1, 1)


def full_position_map(channels, size, device=None, sizes=SD_V1):
    """The whole map stretched to a latent of size (h, w): the layout of the photo at any aspect."""
    whole = [0, 0, sizes.grid, sizes.grid]
    return crop_position_map(position_map(channels, sizes=sizes), whole, size).to(device)
