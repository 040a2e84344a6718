"""Train the toy base model from scratch, seeded: python -m toy.pretrain

    1. The VAE learns to turn a 64 x 64 scene into a 16 x 16 x 4 latent and back (L1 and a small KL
       term). Its latents are then rescaled, exactly, so that LATENT_SCALE * latent has unit spread,
       as SD v1's have: the sampler and SINE use the same constant for every base.
    2. A fixed set of scenes is encoded once.
    3. The UNet and the text encoder learn to predict the noise together, SD's loss, with offset
       noise (see OFFSET_NOISE). One caption in ten is dropped to the empty prompt, so that
       classifier-free guidance has an unconditional model. An exponential moving average of the weights is kept.
    4. Samples for captions seen in training, and for held-out pairs of known words ("a green
       triangle"), are read back with toy.score.describe; the share that shows what was asked is
       printed, and a grid of them is saved. --read-back BASE does only this, on any toy base.

It writes weights/toy-base.safetensors (fp16, about 22 MB), loaded by model.load_sd like any SD v1 file.
The base never sees a position map: like SD v1, it meets one only when SINE fine-tunes it.
"""
import argparse
import copy
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import sine
from pictures import to_pil
from model import LATENT_SCALE, Tokenizer, load_sd
from model.clip import TextEncoder
from model.ddim import sample, text_to_image_eps
from model.loader import CONFIG_KEY, PREFIXES, StableDiffusion
from model.schedule import NUM_TRAIN_TIMESTEPS, add_noise, alphas_cumprod
from model.unet import UNet
from model.vae import VAE

from . import score, world
from .base import TOY, TOY_BASE


def to_pixels(images):
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    return torch.cat([sine.to_tensor(image, (image.height, image.width)) for image in images])


def scene_batch(rng, n):
    scenes = [world.random_scene(rng) for _ in range(n)]
    return scenes, to_pixels([world.draw(s) for s in scenes])


# ---------------------------------------------------------------------------------------------
# 1. The VAE

def cosine(step, steps, warmup=0):
    """Learning-rate factor: linear warm-up, then a cosine decay to a tenth."""
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, rng, steps, batch, lr, kl_weight=1e-6):
    """L1 + MSE reconstruction and SD's small KL term. The log-variance starts at -8, so that the
    sampled latents are nearly exact from the first step."""
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.z_channels:] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * cosine(step, steps)
        _, x = scene_batch(rng, batch)
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        error = vae.decode(z) - x
        loss = error.abs().mean() + error.pow(2).mean() + kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)


RESCALE_SCENES = 256  # scenes that set the latent scale


@torch.no_grad()
def rescale_latents(vae, x):
    """Scale the latent by c, exactly: quant_conv's mean outputs times c (its log-variance plus
    2 log c), post_quant_conv's inputs divided by c. c is chosen so that LATENT_SCALE * mean has
    unit standard deviation on x."""
    mean, _ = vae.encode(x)
    c = 1 / (LATENT_SCALE * mean.std().item())
    z = vae.config.z_channels
    vae.quant_conv.weight[:z] *= c
    vae.quant_conv.bias[:z] *= c
    vae.quant_conv.bias[z:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


# ---------------------------------------------------------------------------------------------
# 3. The UNet and the text encoder

# SD's schedule leaves a little of the clean latent even at t = 999, most of all in its mean, which
# on a 16 x 16 latent is the picture's colour. A model trained on it reads the colour off the
# starting noise, and without guidance paints whatever colour that noise suggests. Noise with a
# random offset per channel teaches it to take the colour from the caption instead (Guttenberg's
# "offset noise"). Training only: sampling and SINE's fine-tuning are unchanged.
OFFSET_NOISE = 0.1
ALPHAS = alphas_cumprod()


def denoiser_loss(unet, text_encoder, latents, ids, empty_ids, batch, generator):
    """SD's eps-MSE on a random batch of (latent, caption) pairs."""
    pick = torch.randint(0, len(latents), (batch,), generator=generator)
    z0, caption = latents[pick], ids[pick].clone()
    caption[torch.rand(batch, generator=generator) < 0.1] = empty_ids
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    noise += OFFSET_NOISE * torch.randn((batch, z0.shape[1], 1, 1), generator=generator)
    return F.mse_loss(unet(add_noise(z0, noise, t, ALPHAS), t, text_encoder(caption)), noise)


def optimizer_step(optimizer, params, loss):
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def train_denoiser(unet, text_encoder, latents, ids, empty_ids, steps, batch, lr, generator):
    """eps-MSE on (latent, caption) pairs; returns an EMA copy of both models."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    ema_params = list(ema[0].parameters()) + list(ema[1].parameters())
    warmup = min(200, steps // 10)
    for step in range(steps):
        optimizer.param_groups[0]["lr"] = lr * cosine(step, steps, warmup)
        loss = denoiser_loss(unet, text_encoder, latents, ids, empty_ids, batch, generator)
        optimizer_step(optimizer, params, loss)
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            print(f"unet step {step}: loss {loss.item():.4f}", flush=True)
    return ema


# ---------------------------------------------------------------------------------------------
# 4. Does it draw what it is asked?

@torch.no_grad()
def generate(sd, captions, seed, steps=25, scale=7.5):
    """One 64 x 64 sample per caption (batched), PIL images."""
    eps_fn = text_to_image_eps(sd.unet, sd.text_encoder(sd.tokenizer(captions)),
                               sd.text_encoder(sd.tokenizer([""])), scale)
    side = TOY.image_size // TOY.vae.factor
    noise = torch.randn((len(captions), 4, side, side), generator=torch.Generator().manual_seed(seed))
    pixels = sd.vae.decode(sample(eps_fn, noise, steps, progress=False) / LATENT_SCALE).clamp(-1, 1)
    return [to_pil(p[None]) for p in pixels]


def accuracy(sd, scenes, seed):
    """Share of samples whose pattern, shape, colour and background all read as captioned, and each alone."""
    images = []
    for i in range(0, len(scenes), 32):
        images += generate(sd, [s.caption() for s in scenes[i:i + 32]], seed + i)
    read = [score.describe(image) for image in images]
    asked = [(s.pattern, s.shape, s.colour, s.background) for s in scenes]
    each = {name: np.mean([r[k] == a[k] for r, a in zip(read, asked)]) for k, name in
            enumerate(("pattern", "shape", "colour", "background"))}
    return {"all": float(np.mean([r == a for r, a in zip(read, asked)])), **{k: float(v) for k, v in each.items()}}, images


def read_back(sd, seed, figure):
    """Step 4: 64 samples of seen captions and 64 of held-out pairs, read back; a grid of 32 of them."""
    check = random.Random(seed + 1)
    seen, seen_images = accuracy(sd, [world.random_scene(check) for _ in range(64)], seed=1)
    unseen, unseen_images = accuracy(sd, [world.random_scene(check, held_out=True) for _ in range(64)], seed=2)
    for name, result in (("seen captions", seen), ("held-out word pairs", unseen)):
        print(f"{name}: all four right {result['all']:.0%} (pattern {result['pattern']:.0%}, shape "
              f"{result['shape']:.0%}, colour {result['colour']:.0%}, background {result['background']:.0%}; 64 samples)")
    if figure:
        grid(seen_images[:16] + unseen_images[:16]).save(figure)
        print(f"samples: {figure} (top two rows seen captions, bottom two held-out pairs)")


def grid(images, columns=8):
    w, h = images[0].size
    out = Image.new("RGB", (columns * w, -(-len(images) // columns) * h), "white")
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out


# ---------------------------------------------------------------------------------------------

def save(path, unet, vae, text_encoder, metadata):
    state = {PREFIXES[part] + name: tensor.detach().half().contiguous()
             for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
             for name, tensor in module.state_dict().items()}
    save_file(state, path, metadata={CONFIG_KEY: TOY.to_json(), **metadata})


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the toy base model from scratch.")
    p.add_argument("--out", default=TOY_BASE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--unet-steps", type=int, default=4500)
    p.add_argument("--batch", type=int, default=32, help="the UNet's")
    p.add_argument("--scenes", type=int, default=20_000, help="scenes the UNet trains on")
    p.add_argument("--figure", default="docs/toy-base.png", help="grid of samples for seen and held-out captions")
    p.add_argument("--read-back", metavar="BASE", help="train nothing: step 4 only, on BASE (e.g. the committed file)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.read_back:
        return read_back(load_sd(args.read_back), args.seed, args.figure)
    start = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    unet, vae, text_encoder = UNet(TOY.unet), VAE(TOY.vae), TextEncoder(TOY.text_encoder)
    tokenizer = Tokenizer()

    train_vae(vae, rng, args.vae_steps, args.vae_batch, lr=3e-4)  # at 1e-3 it drew no stripes after 1000 steps
    vae.requires_grad_(False).eval()
    c = rescale_latents(vae, scene_batch(rng, RESCALE_SCENES)[1])
    print(f"latents rescaled by {c:.3f} ({time.time() - start:.0f} s)", flush=True)

    scenes = [world.random_scene(rng) for _ in range(args.scenes)]
    with torch.no_grad():
        latents = torch.cat([LATENT_SCALE * vae.encode(to_pixels([world.draw(s) for s in scenes[i:i + 256]]))[0]
                             for i in range(0, len(scenes), 256)])
    captions = sorted({s.caption() for s in scenes})
    caption_ids = dict(zip(captions, tokenizer(captions)))
    ids = torch.stack([caption_ids[s.caption()] for s in scenes])
    print(f"{len(scenes)} scenes encoded, {len(captions)} captions ({time.time() - start:.0f} s)", flush=True)

    unet, text_encoder = train_denoiser(unet, text_encoder, latents, ids, tokenizer([""])[0], args.unet_steps,
                                        args.batch, 5e-4, torch.Generator().manual_seed(args.seed))
    minutes = (time.time() - start) / 60
    save(args.out, unet, vae, text_encoder, {"toy.pretrain": " ".join(argv) or "defaults", "minutes": f"{minutes:.1f}"})
    print(f"wrote {args.out} after {minutes:.1f} minutes", flush=True)

    read_back(StableDiffusion(unet.eval(), vae, text_encoder.eval(), tokenizer, TOY, "toy", {}), args.seed, args.figure)


if __name__ == "__main__":
    main()
