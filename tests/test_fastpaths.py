"""The fast paths compute what the plain paths compute, within stated tolerances.

Every fast path can be switched off; here each is run both ways on the tiny random model
(model.tiny.TINY) and compared. Timings live in bench.py and BENCHMARKS.md, never here.

  fast path                        switch                               tolerance (and why)
  fused attention (SDPA)           model.attention.USE_SDPA             1e-5 relative: fp32 rounding
  channels_last                    cli.speed_up(channels_last=True)    1e-5 relative: fp32 rounding
  gradient checkpointing           unet.gradient_checkpointing          exact: the same ops, recomputed
  bf16 autocast                    cli.bf16_autocast(device, True)     3e-2 relative (bf16 keeps 8
                                                                        significant bits: ~4e-3 per op)
  bf16 weights for sampling        cli.speed_up(weights_dtype=bf16)     exact, under bf16 autocast
  VAE in fp32 inside autocast      always on                            exact, and never NaN in fp16
  tiled VAE decode / encode        vae.decode(z, tiled=True)            exact blending; the VAE itself
                                                                        drifts, see TILE_TOL below

test_model.py already checks SDPA on the UNet, CLIP and VAE decode forwards; this file adds the
causal mask, gradients, and the VAE encoder. torch.compile is checked only for keeping the
checkpoint's parameter names: compiling even the tiny UNet takes minutes on a small CPU.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cli
import model.attention
import model.unet
import model.vae
import sine
from model import load_sd
from model.schedule import alphas_cumprod
from model.tiny import TINY, write_checkpoint

FP32_TOL = 1e-5   # max|a - b| / max|b|: the same maths in another order
BF16_TOL = 3e-2   # max|a - b| / max|b| for a whole tiny UNet or text encoder pass under bf16 autocast
# Tiled against untiled VAE, tiny random model, TILE=32 and OVERLAP=8 latent pixels (`tiles_small`):
# each tile's GroupNorms and mid-block attention see only that tile, so the output drifts. Measured
# over three seeds, in units of the untiled output's standard deviation: decode mean |diff| 0.05-0.07,
# max 0.96-1.13; encode (mean and logvar) mean 0.04, max 0.24-0.30. Asserted with some margin:
TILE_TOL = {"mean": 0.12, "max": 2.0}
LATENT = (40, 48)  # 3 x 2 tiles of 32 with at least 8 overlap


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("fastpaths") / "tiny.safetensors"
    write_checkpoint(path, TINY, seed=0)
    return load_sd(path)


def unet_inputs(cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, 16, 24, generator=g)
    t = torch.tensor([37, 861][:batch])
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)
    pos = torch.randn(1, cfg.model_channels, 16, 24, generator=g)
    return x, t, context, pos


def assert_grads_close(got, expected, tol):
    """Per tensor, relative to the largest gradient of the whole model: some gradients are ~0 in
    exact arithmetic (e.g. a conv bias right before a GroupNorm) and hold only rounding noise."""
    scale = max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        assert (got[name] - g).abs().max().item() <= tol * scale, name


def unet_grads(unet, inputs, loss_scale=1.0):
    """Gradients of a scalar function of the UNet's output with respect to all its parameters."""
    unet.zero_grad(set_to_none=True)
    with torch.enable_grad():
        unet.requires_grad_(True)
        out = unet(*inputs)
        (loss_scale * out.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters()}
    unet.requires_grad_(False).zero_grad(set_to_none=True)
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------
# Fused attention (SDPA) against the formula: what test_model.py does not cover

@pytest.mark.parametrize("Tq, Tk", [(77, 77), (5, 9)])
def test_causal_sdpa_matches_formula_and_hides_the_future(monkeypatch, Tq, Tk):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, T, 16, generator=g, requires_grad=True) for T in (Tq, Tk, Tk))
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(model.attention, "USE_SDPA", fused)
        out = model.attention.attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results[fused] = (out, *grads)
        # query i sees keys 0..i only: changing key/value j leaves the outputs of queries < j alone
        j = Tq // 2
        k2, v2 = k.detach().clone(), v.detach().clone()
        k2[:, :, j:] += 1.0
        v2[:, :, j:] -= 1.0
        changed = model.attention.attention(q.detach(), k2, v2, causal=True)
        assert torch.allclose(changed[:, :, :j], out.detach()[:, :, :j], atol=1e-6)
        assert not torch.allclose(changed[:, :, j:], out.detach()[:, :, j:], atol=1e-3)
    for a, b in zip(results[True], results[False]):
        assert rel_err(a, b) <= FP32_TOL
    assert rel_err(results[True][0], model.attention.attention(q, k, v, causal=False)) > 0.01  # the mask matters


def test_sdpa_vae_encoder_matches_formula(sd, monkeypatch):
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    outputs = []
    for fused in (True, False):
        monkeypatch.setattr(model.attention, "USE_SDPA", fused)
        with torch.no_grad():
            outputs.append(sd.vae.encode(images))
    for a, b in zip(*outputs):
        assert rel_err(a, b) <= FP32_TOL


def test_sdpa_gradients_match_formula(sd, monkeypatch):
    """Fine-tuning backpropagates through attention: UNet and text encoder gradients agree."""
    inputs = unet_inputs(sd.config.unet)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(model.attention, "USE_SDPA", fused)
        _, grads = unet_grads(sd.unet, inputs)
        sd.text_encoder.requires_grad_(True)
        sd.text_encoder(ids).square().mean().backward()
        grads.update({"text." + n: p.grad.clone() for n, p in sd.text_encoder.named_parameters()})
        sd.text_encoder.requires_grad_(False).zero_grad(set_to_none=True)
        results.append(grads)
    assert_grads_close(results[0], results[1], FP32_TOL)


# ---------------------------------------------------------------------------------------------
# channels_last, gradient checkpointing, torch.compile

def test_channels_last_matches_default(sd):
    inputs = unet_inputs(sd.config.unet)
    plain = model.unet.UNet(sd.config.unet).eval()
    plain.load_state_dict(sd.unet.state_dict())
    fast = model.unet.UNet(sd.config.unet).eval()
    fast.load_state_dict(sd.unet.state_dict())
    cli.speed_up(fast, channels_last=True)
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)  # really switched
    out_plain, grads_plain = unet_grads(plain, inputs)
    out_fast, grads_fast = unet_grads(fast, inputs)
    assert out_fast.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out_fast, out_plain) <= FP32_TOL
    assert_grads_close(grads_fast, grads_plain, FP32_TOL)


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(sd, monkeypatch, bf16):
    """With the position map, in fp32 and under bf16 autocast (the recomputation must use the same
    autocast state as the first pass, or the gradients would silently change)."""
    calls = []
    real = model.unet.checkpoint
    monkeypatch.setattr(model.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = unet_inputs(sd.config.unet)
    results = []
    for checkpointing in (False, True):
        sd.unet.gradient_checkpointing = checkpointing
        with cli.bf16_autocast(torch.device("cpu"), bf16) or torch.autocast("cpu", enabled=False):
            results.append(unet_grads(sd.unet, inputs))
    sd.unet.gradient_checkpointing = False
    assert len(calls) == len(sd.unet.input_blocks) - 1 + 1 + len(sd.unet.output_blocks)  # every block
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-6, atol=0), name


def test_compile_keeps_the_checkpoint_names(sd):
    unet = model.unet.UNet(sd.config.unet)
    names = list(unet.state_dict())
    cli.speed_up(unet, compile=True)
    assert list(unet.state_dict()) == names  # save_finetuned and apply_finetuned need these
    assert unet._compiled_call_impl is not None


# ---------------------------------------------------------------------------------------------
# bf16 autocast

def test_bf16_autocast_defaults():
    assert cli.bf16_autocast(torch.device("cpu")) is None  # off on CPU unless asked
    assert cli.bf16_autocast(torch.device("cpu"), False) is None
    region = cli.bf16_autocast(torch.device("cpu"), True)
    assert region.fast_dtype == torch.bfloat16 and region.device == "cpu"


def test_bf16_autocast_close_to_fp32(sd):
    inputs = unet_inputs(sd.config.unet)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unet32, text32 = sd.unet(*inputs), sd.text_encoder(ids)
        with cli.bf16_autocast(torch.device("cpu"), True):
            unet16, text16 = sd.unet(*inputs), sd.text_encoder(ids)
    assert unet16.dtype == torch.bfloat16  # it really ran in bf16 (CLIP's last LayerNorm answers in fp32)...
    for a, b in ((unet16, unet32), (text16, text32)):
        assert 1e-4 < rel_err(a, b) <= BF16_TOL  # ...and stayed close


def test_bf16_weights_for_sampling_change_nothing_under_autocast(sd):
    """speed_up(weights_dtype=torch.bfloat16) rounds the Linear and Conv weights once, as autocast would on
    every call: the output must be bitwise the same; norm layers keep fp32 parameters."""
    inputs = unet_inputs(sd.config.unet)
    fast = model.unet.UNet(sd.config.unet).eval().requires_grad_(False)
    fast.load_state_dict(sd.unet.state_dict())
    cli.speed_up(fast, weights_dtype=torch.bfloat16)
    assert fast.input_blocks[0][0].weight.dtype == fast.time_embed[0].weight.dtype == torch.bfloat16
    assert fast.out[0].weight.dtype == torch.float32  # a GroupNorm
    with torch.no_grad(), cli.bf16_autocast(torch.device("cpu"), True):
        assert torch.equal(fast(*inputs), sd.unet(*inputs))


def test_bf16_edit_close_to_fp32(sd):
    """A whole (tiny) SINE edit: the sampler state, the guidance arithmetic and the VAE stay fp32."""
    cfg = sd.config.unet
    g = torch.Generator().manual_seed(5)
    cond, uncond, c_hat = (torch.randn(1, 77, cfg.context_dim, generator=g) for _ in range(3))
    noise = torch.randn(1, 4, 16, 24, generator=g)
    guide = sine.Guide(sd.unet, c_hat, sine.full_position_map(cfg.model_channels, (16, 24)), v=0.7, K=400)
    run = lambda autocast: sine.edit(sd, [guide], cond, uncond, noise, steps=6, progress=False, autocast=autocast)
    fp32, bf16 = run(None), run(cli.bf16_autocast(torch.device("cpu"), True))
    assert bf16.dtype == torch.float32
    drift = (bf16 - fp32).abs()
    assert 0 < drift.mean() <= 0.05 and drift.max() <= 0.5  # pixels in [-1, 1]


def test_bf16_training_keeps_fp32_master_weights(sd):
    """lr 1e-6 steps are below bf16's resolution near 1: the weights must stay fp32 and move."""
    unet = model.unet.UNet(sd.config.unet)
    unet.load_state_dict(sd.unet.state_dict())
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6, weight_decay=0.01)
    x, t, context, pos = unet_inputs(sd.config.unet, batch=1)
    with cli.bf16_autocast(torch.device("cpu"), True):
        loss = sine.training_loss(unet, x, context, t, torch.randn_like(x), alphas_cumprod(), pos)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in unet.parameters())
    optimizer.step()
    moved = [(p - before[n]).abs().max().item() for n, p in unet.named_parameters()]
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert min(moved) > 1e-7 and max(moved) < 1e-5  # every tensor took an lr-sized step


# ---------------------------------------------------------------------------------------------
# The VAE never computes in half precision

def test_vae_runs_in_fp32_inside_half_autocast(sd):
    """Make the decoder's activations overflow fp16 (conv_in x 1e5): plain fp16 autocast then gives
    inf/NaN, while vae.decode and vae.encode ignore the autocast and give the fp32 result exactly."""
    vae = model.vae.VAE(sd.config.vae).eval()
    vae.load_state_dict(sd.vae.state_dict())
    with torch.no_grad():
        vae.decoder.conv_in.weight *= 1e5
        vae.decoder.conv_in.bias *= 1e5
        latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(6))
        images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(7)) * 2 - 1
        fp32 = vae.decode(latents)
        mean32, logvar32 = vae.encode(images)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cpu", dtype=dtype):
                if dtype == torch.float16:
                    unguarded = vae.decoder(vae.post_quant_conv(latents))
                    assert not unguarded.isfinite().all()  # the hazard is real in this setting
                decoded = vae.decode(latents.to(dtype))
                mean, logvar = vae.encode(images.to(dtype))
            assert fp32.isfinite().all() and decoded.isfinite().all() and decoded.dtype == torch.float32
            assert torch.equal(decoded, vae.decode(latents.to(dtype).float()))
            assert torch.equal(mean, vae.encode(images.to(dtype).float())[0])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_load_sd_does_not_keep_the_file_mapped(tmp_path):
    """Weights read into memory of their own, not views of a memory map of the file: a mapped file
    counts as the process's memory for as long as any of its tensors lives (even after a cast to bf16
    replaced most of them), and a file changed on disk would change a running model."""
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path, TINY, seed=0)
    loaded = load_sd(path)
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()
    assert loaded.unet is not None


def test_load_sd_keeps_the_vae_fp32(tmp_path):
    path = tmp_path / "tiny16.safetensors"
    write_checkpoint(path, TINY, dtype=torch.float16)
    half = load_sd(path, dtype=torch.float16)
    assert half.unet.input_blocks[0][0].weight.dtype == half.unet.time_embed[0].bias.dtype == torch.float16
    assert half.unet.out[0].weight.dtype == torch.float32  # a GroupNorm: as cli.speed_up leaves it
    assert all(p.dtype == torch.float32 for p in [*half.vae.parameters(), *half.text_encoder.parameters()])
    rounded = cli.speed_up(load_sd(path).unet, weights_dtype=torch.float16)  # the same weights, rounded after loading
    assert all(torch.equal(a, b) for a, b in zip(half.unet.state_dict().values(), rounded.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Tiled VAE

@pytest.fixture
def tiles_small(monkeypatch):
    """Tiles of 32 latent pixels (256 image pixels), overlap 8: several tiles on a tiny image."""
    monkeypatch.setattr(model.vae, "TILE", 32)
    monkeypatch.setattr(model.vae, "OVERLAP", 8)


@pytest.mark.parametrize("size, tile, overlap", [(48, 32, 8), (40, 32, 8), (33, 32, 8), (100, 24, 6), (32, 32, 8)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    starts = model.vae.tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared
    assert len(starts) == max(1, math.ceil((size - overlap) / (tile - overlap)))  # no more tiles than needed


@pytest.mark.parametrize("size, tile, overlap, scale", [(100, 24, 6, 8), (40, 32, 8, 8), (800, 192, 64, 1 / 8)])
def test_blend_weights_ramp_linearly_and_sum_to_one(size, tile, overlap, scale):
    """Across each overlap one tile fades out linearly while the next fades in: the weights of all
    tiles sum to 1 at every output pixel, so blending alone never brightens or darkens a seam."""
    starts = model.vae.tile_starts(size, tile, overlap, multiple=round(1 / scale) if scale < 1 else 1)
    total = torch.zeros(round(size * scale))
    for start, w in zip(starts, model.vae.blend_weights(starts, tile, scale, "cpu")):
        total[round(start * scale):round(start * scale) + len(w)] += w
        peak = int(w.argmax())
        assert 0 < w.min() and w.max() == 1 and (w[:peak].diff() >= 0).all() and (w[peak:].diff() <= 0).all()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 4, 40, 48), (2, 4, 33, 70), (1, 4, 20, 24)])
def test_tile_blending_is_exact_for_a_local_function(shape):
    """For a function without any reach across pixels, tiles blended with weights summing to 1 must
    reproduce the untiled result: this checks the tiling itself, apart from the VAE's own drift."""
    g = torch.Generator().manual_seed(8)
    conv = torch.nn.Conv2d(4, 3, 1)
    up = lambda z: conv(F.interpolate(z, scale_factor=8.0, mode="nearest"))
    down = lambda x: F.avg_pool2d(x, 8) * 2.0 - 0.5
    z = torch.randn(*shape, generator=g)
    x = torch.randn(shape[0], 3, 8 * shape[2], 8 * shape[3], generator=g)
    with torch.no_grad():
        assert rel_err(model.vae.tile_apply(up, z, 24, 8, scale=8), up(z)) <= FP32_TOL
        assert rel_err(model.vae.tile_apply(down, x, 192, 64, scale=1 / 8), down(x)) <= FP32_TOL


def drift(tiled, plain):
    d = (tiled - plain).abs()
    return d.mean().item() / plain.std().item(), d.max().item() / plain.std().item()


def test_tiled_decode_close_to_untiled(sd, tiles_small):
    latents = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain, tiled = sd.vae.decode(latents), sd.vae.decode(latents, tiled=True)
    mean, worst = drift(tiled, plain)
    assert 0 < mean <= TILE_TOL["mean"] and worst <= TILE_TOL["max"]


def test_tiled_encode_close_to_untiled(sd, tiles_small):
    images = torch.rand(1, 3, 8 * LATENT[0], 8 * LATENT[1], generator=torch.Generator().manual_seed(10)) * 2 - 1
    with torch.no_grad():
        (mean_plain, logvar_plain), (mean_tiled, logvar_tiled) = sd.vae.encode(images), sd.vae.encode(images, tiled=True)
    for tiled, plain in ((mean_tiled, mean_plain), (logvar_tiled, logvar_plain)):
        mean, worst = drift(tiled, plain)
        assert 0 < mean <= TILE_TOL["mean"] and worst <= TILE_TOL["max"]


def test_one_tile_is_exact_and_auto_tiles_only_large_images(sd, tiles_small, monkeypatch):
    small = torch.randn(1, 4, 32, 24, generator=torch.Generator().manual_seed(11))  # fits in one tile
    large = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(12))  # two tiles
    monkeypatch.setattr(model.vae, "AUTO_TILE_PIXELS", 64 * 32 * 24)
    with torch.no_grad():
        plain = sd.vae.decode(small)
        assert torch.equal(sd.vae.decode(small, tiled=True), plain)
        assert torch.equal(sd.vae.decode(small, tiled=None), plain)
        auto = sd.vae.decode(large, tiled=None)
        assert torch.equal(auto, sd.vae.decode(large, tiled=True))
        assert not torch.equal(auto, sd.vae.decode(large))
