"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") as SD v1 uses it.

A model trained on 1000 noise levels can be sampled on a coarse subsequence of them (50 by
default). Each DDIM step estimates the clean latent from the current noise prediction, then
re-noises it to the next, lower noise level along the same predicted noise direction; with
eta = 0 no fresh noise is added and sampling is deterministic given the starting noise.

The sampler does not know about models or prompts: it takes `eps_fn(z, t)`, any function that
returns the (already guided) noise prediction. Plain text-to-image classifier-free guidance and
SINE's model-based guidance are just different eps_fns plugged into the same loop.
"""

import torch
from tqdm import tqdm

from model.schedule import NUM_TRAIN_TIMESTEPS, alphas_cumprod, predict_x0


def ddim_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The S training timesteps DDIM visits, noisiest first: e.g. S=50 -> 981, 961, ..., 21, 1."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    stride = num_train_timesteps // num_steps
    # Evenly spaced from 0, shifted by 1 (SD v1's steps_offset) so the last step is t=1 and the
    # first lands near the top of the schedule. Exactly num_steps steps, even when S does not
    # divide 1000 (like diffusers; CompVis's range() would add one more step there).
    return (torch.arange(num_steps, dtype=torch.long) * stride + 1).flip(0)


def ddim_step(
    z_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update z_t -> z_{t_prev} (Song et al. 2021, Eq. 12):

        z_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise
        x0_hat = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
        sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)     (Eq. 16)

    t_prev < 0 means "after the last step": SD v1 then uses a_0 rather than 1
    (set_alpha_to_one=False), so the final output keeps the tiny noise level of t=0.
    """
    alphas = alphas_cumprod.to(device=z_t.device, dtype=torch.float32)
    t, t_prev = int(t), int(t_prev)
    a_t = alphas[t]
    a_prev = alphas[t_prev] if t_prev >= 0 else alphas[0]

    z, e = z_t.float(), eps.float()
    x0_hat = (z - (1 - a_t).sqrt() * e) / a_t.sqrt()

    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    # The noise direction shrinks by exactly the variance that fresh noise puts back, so the
    # marginal noise level at t_prev stays 1 - a_prev whatever eta is.
    z_prev = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma**2).sqrt() * e
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        z_prev = z_prev + sigma * noise.float()
    return z_prev.to(z_t.dtype)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 2 of the SINE paper (Ho & Salimans 2022): push the prediction away from the
    unconditional one, along the direction the prompt adds. scale=1 is the plain conditional model.
    The paper writes it w * eps_cond + (1 - w) * eps_uncond: the same sum, rearranged."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sample(eps_fn, z: torch.Tensor, num_steps: int = 50, eta: float = 0.0, generator=None, progress: bool = True,
           callback=None):
    """Run DDIM from noise z (at the top noise level) down to a clean latent z_0.

    eps_fn(z, t) -> noise prediction, t a python int in 0..999. With eta > 0 the step noise is
    drawn with torch.randn(generator=generator), in the generator's device, so a seeded CPU
    generator gives the same noise on any device (the pixels still differ a little: each device
    sums in its own order and precision). callback(t, x0_hat), if given, sees every
    step's estimate of the clean latent: a window on how the picture forms.
    """
    alphas = alphas_cumprod().to(z.device)
    ts = ddim_timesteps(num_steps).tolist()
    prevs = ts[1:] + [-1]  # the last step goes "below zero": ddim_step then uses a_0
    for t, t_prev in tqdm(list(zip(ts, prevs)), desc="DDIM", disable=not progress):
        eps = eps_fn(z, t)
        if callback is not None:
            callback(t, predict_x0(z, eps, torch.full((z.shape[0],), t, device=z.device), alphas))
        noise = None
        if eta > 0:
            device = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=device, dtype=z.dtype).to(z.device)
        z = ddim_step(z, eps, t, t_prev, alphas, eta=eta, noise=noise)
    return z


def text_to_image_eps(unet, context: torch.Tensor, uncond_context: torch.Tensor, scale: float, position=None):
    """eps_fn for plain SD text-to-image: conditional and unconditional predictions from ONE UNet
    call of batch 2B (half the kernel launches of two calls), combined by classifier-free guidance.

    context: [B, 77, 768] prompt embeddings; uncond_context: [B or 1, 77, 768] for the empty prompt;
    position: SINE's whole position map for a fine-tuned model sampled alone, (1, C, h, w), or None.
    """
    batch = context.shape[0]
    both = torch.cat([context, uncond_context.expand(batch, -1, -1)])  # (2B, 77, 768)

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        t_batch = torch.full((2 * batch,), t, dtype=torch.long, device=z.device)
        eps_cond, eps_uncond = unet(torch.cat([z, z]), t_batch, both, pos=position).float().chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, scale)

    return eps_fn
