"""The schedule and DDIM sampler against diffusers' DDIMScheduler configured like SD v1."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from model.ddim import classifier_free_guidance, ddim_step, ddim_timesteps, sample, text_to_image_eps
from model.schedule import add_noise, alphas_cumprod, predict_x0

SHAPE = (2, 4, 24, 40)  # non-square, so a height/width mix-up would show


def sd_scheduler(num_steps=None):
    s = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="epsilon",
    )
    if num_steps is not None:
        s.set_timesteps(num_steps)
    return s


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def fake_eps_fn(seed=0):
    """A deterministic stand-in for a UNet: a fixed random channel mix of z plus a t-dependent field."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 4, generator=g) / 2
    field = torch.randn(SHAPE[1:], generator=g)

    def eps_fn(z, t):
        return torch.einsum("oc,bchw->bohw", mix, z) + torch.cos(torch.tensor(t / 150.0)) * field

    return eps_fn


@pytest.mark.parametrize("num_steps", [1, 3, 7, 10, 50, 100, 250, 1000])
def test_timesteps_match_diffusers(num_steps):
    ours = ddim_timesteps(num_steps)
    assert ours.dtype == torch.long
    assert torch.equal(ours, sd_scheduler(num_steps).timesteps.long())


def test_timesteps_reject_bad_counts():
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(bad)


def test_alphas_cumprod_match_diffusers():
    ours, ref = alphas_cumprod(), sd_scheduler().alphas_cumprod
    assert ours.dtype == torch.float32 and ours.shape == (1000,)
    # diffusers builds the table in float32, we in float64 like the original SD code: they
    # differ by float32 round-off (about 1e-6 relative), far below any wrong-schedule error.
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_alphas_cumprod_match_original_sd_float64():
    # The original SD code (and the buffers stored in its checkpoints) does this in float64.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ref = torch.from_numpy(np.cumprod(1.0 - betas).astype(np.float32))
    torch.testing.assert_close(alphas_cumprod(), ref, rtol=1e-7, atol=0)


def test_every_step_matches_diffusers_eta0():
    sched, eps_fn, alphas = sd_scheduler(50), fake_eps_fn(), alphas_cumprod()
    ts = sched.timesteps.tolist()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = eps_fn(x, t)
        ref = sched.step(eps, t, x, eta=0.0).prev_sample
        ours = ddim_step(x, eps, t, t_prev, alphas)
        assert rel_err(ours, ref) <= 1e-5, f"step t={t}"
        x = ref  # follow the reference trajectory, so each step is judged on its own


def test_sample_loop_matches_diffusers_loop():
    sched, eps_fn = sd_scheduler(50), fake_eps_fn()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    seen = []

    def recording_eps_fn(x, t):
        assert isinstance(t, int)
        seen.append(t)
        return eps_fn(x, t)

    ours = sample(recording_eps_fn, z.clone(), num_steps=50, progress=False)
    ref = z.clone()
    for t in sched.timesteps:
        ref = sched.step(eps_fn(ref, int(t)), t, ref, eta=0.0).prev_sample
    assert seen == sched.timesteps.tolist()
    assert rel_err(ours, ref) <= 1e-5


def test_eta_step_matches_diffusers_with_same_noise():
    sched, eps_fn, alphas = sd_scheduler(10), fake_eps_fn(), alphas_cumprod()
    ts = sched.timesteps.tolist()
    g = torch.Generator().manual_seed(3)
    for i in (0, 4, len(ts) - 1):  # first, middle and the last step (t_prev < 0)
        t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        x, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        eps = eps_fn(x, t)
        ref = sched.step(eps, t, x, eta=0.7, variance_noise=noise).prev_sample
        ours = ddim_step(x, eps, t, t_prev, alphas, eta=0.7, noise=noise)
        assert rel_err(ours, ref) <= 1e-5, f"step t={t}"
        # the noise must actually matter, or this test would pass with sigma = 0
        assert rel_err(ddim_step(x, eps, t, t_prev, alphas, eta=0.0), ref) > 1e-3


def test_eta_sample_matches_diffusers_with_same_generator():
    sched, eps_fn = sd_scheduler(10), fake_eps_fn()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = sample(eps_fn, z.clone(), num_steps=10, eta=1.0, generator=torch.Generator().manual_seed(5), progress=False)
    ref, g = z.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        ref = sched.step(eps_fn(ref, int(t)), t, ref, eta=1.0, generator=g).prev_sample
    assert rel_err(ours, ref) <= 1e-5


def test_eta_without_noise_raises():
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError):
        ddim_step(x, x, 981, 961, alphas_cumprod(), eta=0.5)


def test_add_noise_matches_diffusers_and_predict_x0_inverts_it():
    g = torch.Generator().manual_seed(6)
    z0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in ([0, 999], [1, 500], [250, 750]):
        t = torch.tensor(t, dtype=torch.long)
        z_t = add_noise(z0, noise, t, alphas_cumprod())
        torch.testing.assert_close(z_t, sd_scheduler().add_noise(z0, noise, t), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(predict_x0(z_t, noise, t, alphas_cumprod()), z0, rtol=1e-4, atol=1e-4)


def test_classifier_free_guidance():
    g = torch.Generator().manual_seed(7)
    u, c = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    torch.testing.assert_close(classifier_free_guidance(u, c, 1.0), c)
    torch.testing.assert_close(classifier_free_guidance(u, c, 0.0), u)
    torch.testing.assert_close(classifier_free_guidance(u, c, 7.5), -6.5 * u + 7.5 * c)


def test_text_to_image_eps_batches_cond_and_uncond():
    calls = []

    def fake_unet(x, t, context, pos=None):
        calls.append((x.shape, t))
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float()

    g = torch.Generator().manual_seed(8)
    context, uncond = torch.randn(2, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    z = torch.randn(SHAPE, generator=g)
    eps = text_to_image_eps(fake_unet, context, uncond, 7.5)(z, 981)

    assert len(calls) == 1 and calls[0][0] == (4, *SHAPE[1:])
    assert calls[0][1].dtype == torch.long and calls[0][1].tolist() == [981] * 4
    t = torch.full((2,), 981, dtype=torch.long)
    calls.clear()
    expected = classifier_free_guidance(fake_unet(z, t, uncond.expand(2, -1, -1)), fake_unet(z, t, context), 7.5)
    torch.testing.assert_close(eps, expected)


def test_callback_sees_each_steps_clean_estimate_as_diffusers_computes_it():
    """sample(callback=...) reports, per step, the x0_hat of that step: diffusers' pred_original_sample."""
    sched, eps_fn = sd_scheduler(20), fake_eps_fn()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    seen = []
    out = sample(eps_fn, z.clone(), num_steps=20, progress=False, callback=lambda t, x0: seen.append((t, x0)))
    assert [t for t, _ in seen] == sched.timesteps.tolist()
    ref = z.clone()
    for (t, x0), t_ref in zip(seen, sched.timesteps):
        step = sched.step(eps_fn(ref, int(t_ref)), t_ref, ref, eta=0.0)
        assert rel_err(x0, step.pred_original_sample) <= 1e-5
        ref = step.prev_sample
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(seen[-1][1], out) < rel_err(seen[0][1], out)  # the estimate converges on the result
