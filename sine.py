"""SINE: SINgle image Editing with text-to-image diffusion models (Zhang et al., arXiv 2212.04489).

The method, top to bottom. Stable Diffusion v1 itself lives in model/.

  1. Prompts: `[*]` marks the thing being learned.
  2. The position map (Sec. 3.3): where in the image a crop came from.
  3. Patch-based fine-tuning (Sec. 3.3): random crops, the loss, AdamW applied during backward,
     one training step.
  4. Model-based classifier-free guidance (Sec. 3.2, Eq. 2 and 3) and the sampler.
  5. The fine-tuned file: the difference from the base weights (or LoRA adapters, model/lora.py),
     plus what edit.py needs.

Reading photos safely and the speed switches (bf16, channels_last, torch.compile) live in cli.py,
and saving files all or nothing in model/loader.py: they are not the method. What remains here of
that kind is the few checks for nan and inf that must sit where a diverged run is caught.

Numbers that the paper leaves open come from the authors' code; SOURCES.md says, choice by choice,
what the paper says, what the authors' code does and what we do.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from model import LATENT_SCALE, lora
from model.ddim import classifier_free_guidance, sample
from model.loader import PREFIXES, atomic_path, fingerprint, iter_tensors, load_sd, read_header, write_safetensors
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

    The fractions are the paper's (Sec. 4); drawing them in whole cells of 8 pixels is the authors'."""
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


def adamw_in_backward(params, lr, weight_decay=0.01, fused=False):
    """AdamW that updates each parameter as soon as backward has its gradient, then frees that gradient.

    The usual loss.backward(); optimizer.step() holds a whole set of gradients (3.9 GB for SD v1)
    until the step. Here at most a few gradients exist at once. One AdamW per parameter, in
    single-tensor form (or fused, one kernel): the same arithmetic, parameter by parameter, as one
    AdamW over all of them, so the weights come out bitwise the same. This holds with one backward
    a step, at any batch, and no gradient clipping, which needs every gradient before any update.
    Returns {param: its AdamW}, whose .state[param] holds the moments (train.py saves them for --resume)."""
    optimizers = {p: torch.optim.AdamW([p], lr=lr, weight_decay=weight_decay, foreach=False, fused=fused)
                  for p in params}

    def step_and_free(param):
        optimizers[param].step()
        param.grad = None

    for param in params:
        param.register_post_accumulate_grad_hook(step_and_free)
    return optimizers


class NonFiniteLoss(ArithmeticError):
    """The loss became nan or inf: the run has diverged."""


def training_step(sd, canvas, ids, patch, generator, alphas_cumprod, full_map=None, autocast=None, sizes=SD_V1,
                  batch=1):
    """One step on `batch` examples (the paper's is one): forward, then backward, during which
    adamw_in_backward (set up once beforehand) updates the weights; without it, backward leaves the
    gradients for the caller's optimizer (train.py's way on a small model). Both the UNet and the text encoder
    learn, as in the authors' code; the VAE is frozen.
    Returns the loss and the timesteps it was drawn at (train.py logs both).

    A nan or inf loss raises NonFiniteLoss before backward, so no weight is touched by it."""
    examples = [sample_example(sd.vae, canvas, patch, generator, full_map, sizes) for _ in range(batch)]
    z0 = torch.cat([e.z0 for e in examples])                                     # (batch, 4, 64, 64)
    position = None if examples[0].position is None else torch.cat([e.position for e in examples])
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).to(z0.device)
    noise = torch.randn(z0.shape, generator=generator).to(z0)
    with autocast or torch.autocast(z0.device.type, enabled=False):
        context = sd.text_encoder(ids).expand(batch, -1, -1)                     # one prompt for every crop
        loss = training_loss(sd.unet, z0, context, t, noise, alphas_cumprod, position,
                             recon_weight=1.0 if patch else 0.0)
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(value)
    loss.backward()
    return value, t.tolist()


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


# ---------------------------------------------------------------------------------------------
# 5. The fine-tuned file
#
# Ours: the authors saved a 12 GB Lightning checkpoint. We store only what changed, w_ft - w_base,
# for the UNet and the text encoder in fp16: at lr 1e-6 the weights move by ~1e-4, so fp16 copies of
# the whole weights would round the training away, while fp16 *differences* keep it to ~1e-7.

def trainable_parts(sd):
    return {"unet": sd.unet, "text_encoder": sd.text_encoder}


class NonFiniteWeights(ArithmeticError):
    """A weight, or its fp16 difference from the base, is nan or inf: nothing is saved."""


def save_finetuned(path, sd, base_path, metadata):
    """Store (w_finetuned - w_base) in fp16 for every trainable weight, reading the base from its file.

    One tensor at a time, read and written: saving needs no second copy of the model. Refuses
    (NonFiniteWeights) to write a file holding nan or inf, so a diverged run never replaces a good save."""
    if any(lora.adapters(module) for module in trainable_parts(sd).values()):
        return save_adapters(path, sd, base_path, metadata)
    weights = {PREFIXES[part] + name: (sd.file_keys[part][name], weight)
               for part, module in trainable_parts(sd).items() for name, weight in module.state_dict().items()}
    base_header = read_header(base_path)

    def deltas():
        base_weights = iter_tensors(base_path, base_header, {key: file_key for key, (file_key, _) in weights.items()})
        for key, base_weight in base_weights:  # fp32, as load_sd read it
            delta = (weights[key][1].detach().float().cpu() - base_weight).half()
            if not torch.isfinite(delta).all():  # nan or inf weights, or a change beyond fp16's 65504
                raise NonFiniteWeights(f"{key} holds nan or inf values")
            yield delta

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, {key: weight.shape for key, (_, weight) in weights.items()}, deltas(),
                          file_metadata(base_path, metadata))


def file_metadata(base_path, metadata):
    return {"sine.finetuned": "1", "base": os.path.basename(base_path), "base_fingerprint": fingerprint(base_path),
            **{k: str(v) for k, v in metadata.items()}}


def save_adapters(path, sd, base_path, metadata):
    """A LoRA run (model/lora.py) stores its adapters alone, in fp32: megabytes, not the 2 GB of deltas."""
    weights = {PREFIXES[part] + f"{name}.{side}.weight": getattr(layer, side).weight.detach().float().cpu()
               for part, module in trainable_parts(sd).items() for name, layer in lora.adapters(module).items()
               for side in ("lora_down", "lora_up")}
    for key, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise NonFiniteWeights(f"{key} holds nan or inf values")
    layer = next(iter(lora.adapters(sd.unet).values()))
    rank = layer.lora_down.weight.shape[0]
    metadata = file_metadata(base_path, {**metadata, "lora_rank": rank, "lora_alpha": layer.lora_scale * rank})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, {key: w.shape for key, w in weights.items()}, iter(weights.values()), metadata,
                          torch.float32)


def finetuned_weights(path):
    """adjust(part, name, w_base) -> w_finetuned for model.load_sd: the base weight plus this file's
    difference (or its merged adapters), in fp32, before any rounding to a sampling precision.

    bf16 rounds a weight of 0.03 in steps of 1.2e-4, about what 10,000 steps at lr 1e-6 move it:
    rounding the whole fine-tuned weight would round much of the fine-tune away, so the difference
    is added first, and the caller chooses a precision that keeps it (BENCHMARKS.md, precision)."""
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    read = lambda key: read_finite(next(iter_tensors(path, header, {key: key}))[1], key, path)
    if "lora_alpha" not in metadata:
        return lambda part, name, weight: weight + read(PREFIXES[part] + name)
    alpha, suffix = float(metadata["lora_alpha"]), ".lora_down.weight"
    adapted = {key[:-len(suffix)] for key in header if key.endswith(suffix)}

    def merged(part, name, weight):  # W + (alpha / rank) B A, for the layers that have adapters
        layer = PREFIXES[part] + name.removesuffix(".weight")
        if not name.endswith(".weight") or layer not in adapted:
            return weight
        down, up = read(layer + suffix), read(layer + ".lora_up.weight")
        return weight + lora.delta(up, down, alpha / down.shape[0], weight.shape)

    return merged


def read_finite(tensor, key, path):
    """A diverged run's nan or inf is refused with what to do."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{path} holds nan or inf values ({key}): its training diverged; fine-tune again "
                         "with a lower --lr")
    return tensor


def load_finetuned(base_path, path, device="cpu", dtype=torch.float32, shared_vae=None):
    """The fine-tuned model: the base's weights plus the file's, each rounded to dtype only once added."""
    return load_sd(base_path, device, dtype, adjust=finetuned_weights(path), shared_vae=shared_vae)


def apply_finetuned(sd, path):
    """Add a fine-tuned file's differences, or its merged adapters, onto sd's fp32 UNet and text encoder, in place."""
    adjust = finetuned_weights(path)
    with torch.no_grad():
        for part, module in trainable_parts(sd).items():
            for name, weight in module.state_dict().items():
                weight.copy_(adjust(part, name, weight.float()))
    return sd
