"""The DDPM noise schedule of Stable Diffusion v1 (the forward, noising process).

Training corrupts a clean latent z0 in 1000 small steps. Step t adds Gaussian noise of
variance beta_t; composing the steps gives a closed form for any t directly (Ho et al. 2020, Eq. 4):

    z_t = sqrt(a_t) * z0 + sqrt(1 - a_t) * noise,    a_t = prod_{s<=t} (1 - beta_s)

so all we need is the table a_t ("alphas_cumprod"). SD v1 uses the "scaled linear" betas:
linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012). The same formula read backwards turns
a noise prediction into a prediction of the clean latent (predict_x0), which both the DDIM
sampler and SINE's reconstruction loss use.
"""

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod() -> torch.Tensor:
    """a_t for t = 0..999 as float32 [1000]."""
    # float64 for the product of 1000 factors, so the table matches SD's own to the last bit
    # of float32; cast once at the end.
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def _per_sample(alphas: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a_t for each sample of the batch, shaped to broadcast against `like` ([B, 1, 1, ...])."""
    a = alphas.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Jump straight to timestep t: z_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise. t: LongTensor [B]."""
    a = _per_sample(alphas_cumprod, t, z0)
    z_t = a.sqrt() * z0.float() + (1 - a).sqrt() * noise.float()
    return z_t.to(z0.dtype)


def predict_x0(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert add_noise given a noise estimate: z0_hat = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    a = _per_sample(alphas_cumprod, t, z_t)
    z0 = (z_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()
    return z0.to(z_t.dtype)
