"""sine.py, one equation at a time, on a tiny random Stable Diffusion (model.tiny).

Every expected value is computed here, independently of sine.py: by hand from separate UNet calls
(guidance), from the formulas in SOURCES.md in float64 (position map, schedule), with explicit
loops (the reconstruction term), or as the authors' code computes it (crops). The last test fine-tunes a tiny model on one latent and checks
that sampling then reproduces it: training and sampling must agree on the schedule and on what
the UNet predicts, or the sampled latent lands somewhere else.
"""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import finetuned_file
import sine
from model import UNetConfig, load_sd, read_header
from model.ddim import classifier_free_guidance, ddim_timesteps, sample
from model.loader import PREFIXES
from model.schedule import alphas_cumprod
from model.tiny import TINY, write_checkpoint

LATENT = (1, 4, 8, 16)  # non-square, so a height/width mix-up shows; 8 divides by the UNet's 3 downsamplings
SCALE = 7.5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split: on a busy 2-core machine two threads ran each
    UNet call ~8x slower than one. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sine") / "tiny.safetensors"
    write_checkpoint(path, TINY, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def sd(base_path):
    """Read-only in the tests that use it: tests that train load their own copy."""
    return load_sd(base_path)


def perturbed(unet, seed, amount=0.05):
    """A stand-in for a fine-tuned UNet: the base with every weight moved (so its eps differs)."""
    other = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p += amount * p.abs().mean() * torch.randn(p.shape, generator=g)
    return other


class Counting(nn.Module):
    """Wraps a UNet and counts the samples it evaluates (a batch of 2 counts 2)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.samples = 0

    def forward(self, x, t, context, pos=None):
        self.samples += x.shape[0]
        return self.unet(x, t, context, pos)


@pytest.fixture(scope="module")
def setup(sd):
    """Base and two 'fine-tuned' UNets, their contexts, position map and a latent."""
    with torch.no_grad():
        cond, uncond, hat1, hat2 = sd.text_encoder(sd.tokenizer(
            ["a photo of a castle covered by snow", "", "a photo of a sks castle", "a painting in the sks style"])
        ).split(1)
    C = sd.config.unet.model_channels
    pos = sine.full_position_map(C, LATENT[2:])
    z = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    return dict(base=sd.unet, ft1=perturbed(sd.unet, 1), ft2=perturbed(sd.unet, 2), cond=cond, uncond=uncond,
                hat1=hat1, hat2=hat2, pos=pos, z=z)


def eps(unet, z, t, context, pos=None):
    return unet(z, torch.tensor([t]), context, pos)


def assert_guided_close(ours, expected, *terms):
    """ours == expected up to float32 round-off. sine_eps batches the base model's two passes while
    the hand computation does not, which changes the round-off of each UNet output (~1e-6 of |eps|);
    guidance multiplies that by the scale. So the bound is 1e-5 * scale * the largest eps term, far
    below what a wrong formula gives (a misplaced weight moves the result by ~1e-2 or more)."""
    bound = 1e-5 * SCALE * max(term.abs().max().item() for term in terms)
    error = (ours - expected).abs().max().item()
    assert error <= bound, f"max |ours - expected| = {error:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# Eq. 2 / Eq. 3: model-based classifier-free guidance

@torch.no_grad()
def test_v1_is_plain_classifier_free_guidance(setup):
    s = setup
    guide = sine.Guide(s["ft1"], s["hat1"], s["pos"], v=1.0, K=0)
    eps_fn = sine.sine_eps(s["base"], s["cond"], s["uncond"], [guide], SCALE)
    for t in (981, 501, 41):
        e_uncond, e_cond = eps(s["base"], s["z"], t, s["uncond"]), eps(s["base"], s["z"], t, s["cond"])
        assert_guided_close(eps_fn(s["z"], t), classifier_free_guidance(e_uncond, e_cond, SCALE), e_uncond, e_cond)


@pytest.mark.parametrize("K", [1000, int(ddim_timesteps(50)[0])])
@torch.no_grad()
def test_K_at_or_above_first_step_is_plain_cfg_at_every_step(setup, K):
    s = setup
    base, ft = Counting(s["base"]), Counting(s["ft1"])
    sine_fn = sine.sine_eps(base, s["cond"], s["uncond"], [sine.Guide(ft, s["hat1"], s["pos"], v=0.7, K=K)], SCALE)
    visited = []

    def checking_eps_fn(z, t):
        ours = sine_fn(z, t)
        e_uncond, e_cond = eps(s["base"], z, t, s["uncond"]), eps(s["base"], z, t, s["cond"])
        assert_guided_close(ours, classifier_free_guidance(e_uncond, e_cond, SCALE), e_uncond, e_cond)
        visited.append(t)
        return ours

    sample(checking_eps_fn, s["z"], 50, progress=False)
    assert visited == ddim_timesteps(50).tolist()
    assert ft.samples == 0 and base.samples == 2 * 50


@torch.no_grad()
def test_K_just_below_first_step_guides_only_the_first_step(setup):
    """The control for the test above: guidance that is active does change eps."""
    s = setup
    ts = ddim_timesteps(50).tolist()
    ft = Counting(s["ft1"])
    sine_fn = sine.sine_eps(s["base"], s["cond"], s["uncond"], [sine.Guide(ft, s["hat1"], s["pos"], v=0.7, K=ts[1])], SCALE)
    plain = classifier_free_guidance(eps(s["base"], s["z"], ts[0], s["uncond"]),
                                     eps(s["base"], s["z"], ts[0], s["cond"]), SCALE)
    assert rel_err(sine_fn(s["z"], ts[0]), plain) > 1e-3
    for t in ts[1:]:
        sine_fn(s["z"], t)
    assert ft.samples == 1


@torch.no_grad()
def test_unet_evaluations_per_step(setup):
    """3 samples through a UNet for a guided step (t > K), 2 for an unguided one (t <= K)."""
    s = setup
    base, ft = Counting(s["base"]), Counting(s["ft1"])
    eps_fn = sine.sine_eps(base, s["cond"], s["uncond"], [sine.Guide(ft, s["hat1"], s["pos"], v=0.7, K=400)], SCALE)
    for t, guided in ((401, True), (400, False), (981, True), (1, False)):
        before = base.samples + ft.samples
        eps_fn(s["z"], t)
        assert base.samples + ft.samples - before == (3 if guided else 2)


@pytest.mark.parametrize("v", [0.7, 0.3])
@torch.no_grad()
def test_eq3_by_hand(setup, v):
    s = setup
    z, t = s["z"], 701
    eps_fn = sine.sine_eps(s["base"], s["cond"], s["uncond"], [sine.Guide(s["ft1"], s["hat1"], s["pos"], v=v, K=400)], SCALE)
    e_uncond = eps(s["base"], z, t, s["uncond"])
    e_cond = eps(s["base"], z, t, s["cond"])
    e_ft = eps(s["ft1"], z, t, s["hat1"], s["pos"])
    expected = e_uncond + SCALE * (v * e_cond + (1 - v) * e_ft - e_uncond)
    assert_guided_close(eps_fn(z, t), expected, e_uncond, e_cond, e_ft)
    # the fine-tuned term is not negligible here, so swapping v and 1 - v would be caught
    swapped = e_uncond + SCALE * ((1 - v) * e_cond + v * e_ft - e_uncond)
    assert rel_err(swapped, expected) > 1e-3


@torch.no_grad()
def test_each_model_alone_is_shown_at_guided_steps_only(setup):
    """What --strip draws under a guided step: each model's own prediction, of which Eq. 3 is the mix.
    At v = 1 the mix is the pre-trained row exactly; at v = 0.7, 0.7 of it and 0.3 of the fine-tuned row."""
    s = setup
    for v in (1.0, 0.7):
        seen = {}
        guide = sine.Guide(s["ft1"], s["hat1"], s["pos"], v=v, K=400)
        eps_fn = sine.sine_eps(s["base"], s["cond"], s["uncond"], [guide], SCALE,
                               each_alone=lambda z, t, alone: seen.setdefault(t, alone))
        mixed = {t: eps_fn(s["z"], t) for t in (981, 401, 400, 1)}
        assert sorted(seen) == [401, 981]  # nothing at the unguided steps
        for t in (981, 401):
            pretrained, finetuned = seen[t]
            e_uncond, e_ft = eps(s["base"], s["z"], t, s["uncond"]), eps(s["ft1"], s["z"], t, s["hat1"], s["pos"])
            assert_guided_close(finetuned, classifier_free_guidance(e_uncond, e_ft, SCALE), e_uncond, e_ft)
            assert rel_err(finetuned, pretrained) > 1e-3  # two different rows
            if v == 1.0:
                assert torch.equal(mixed[t], pretrained)
            else:
                torch.testing.assert_close(mixed[t], v * pretrained + (1 - v) * finetuned, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_two_guides_style_transfer_by_hand(setup):
    """Multi-model guidance (SOURCES.md): eps_pre("") + w((1 - sum b_i) eps_pre(c) + sum b_i eps_ft_i(c_hat_i) - eps_pre("")),
    b_i = 1 - v_i, each guide only while t > its own K."""
    s = setup
    z = s["z"]
    base, ft1, ft2 = Counting(s["base"]), Counting(s["ft1"]), Counting(s["ft2"])
    pos2 = 0.5 * s["pos"]  # a different map, so the two guides' inputs cannot be swapped unnoticed
    g1 = sine.Guide(ft1, s["hat1"], s["pos"], v=0.8, K=300)
    g2 = sine.Guide(ft2, s["hat2"], pos2, v=0.6, K=600)
    eps_fn = sine.sine_eps(base, s["cond"], s["uncond"], [g1, g2], SCALE)
    b1, b2 = 1 - 0.8, 1 - 0.6
    for t, active in ((801, (1, 2)), (501, (1,)), (201, ())):
        e_uncond, e_cond = eps(s["base"], z, t, s["uncond"]), eps(s["base"], z, t, s["cond"])
        e1, e2 = eps(s["ft1"], z, t, s["hat1"], s["pos"]), eps(s["ft2"], z, t, s["hat2"], pos2)
        mix = {(1, 2): (1 - b1 - b2) * e_cond + b1 * e1 + b2 * e2,
               (1,): (1 - b1) * e_cond + b1 * e1,
               (): e_cond}[active]
        expected = e_uncond + SCALE * (mix - e_uncond)
        before = (base.samples, ft1.samples, ft2.samples)
        assert_guided_close(eps_fn(z, t), expected, e_uncond, e_cond, e1, e2)
        assert (base.samples - before[0], ft1.samples - before[1], ft2.samples - before[2]) == \
               (2, int(1 in active), int(2 in active))


# ---------------------------------------------------------------------------------------------
# The position map

def expected_axis(positions, n_freq):
    """The position map in float64: w_i = exp(-i ln(10000) / (n_freq - 1)); rows [sin(p w_i)] then [cos(p w_i)]."""
    w = np.array([10000.0 ** (-i / (n_freq - 1)) for i in range(n_freq)])
    angles = np.outer(w, np.asarray(positions, dtype=np.float64))  # (n_freq, N)
    return np.concatenate([np.sin(angles), np.cos(angles)])


def test_position_map_frequencies_match_spec():
    C = 320
    m = sine.position_map(C).double().numpy()
    assert m.shape == (C, 128, 128)
    p = np.arange(1, 129)
    x = expected_axis(p, 80)  # (160, 128): varies along the width
    y = expected_axis(p, 80)
    np.testing.assert_allclose(m[:160], np.broadcast_to(x[:, None, :], (160, 128, 128)), atol=5e-5, rtol=0)
    np.testing.assert_allclose(m[160:], np.broadcast_to(y[:, :, None], (160, 128, 128)), atol=5e-5, rtol=0)
    # spelled out: channel 0 is sin(p * 1), the last frequency is 1/10000
    np.testing.assert_allclose(m[0, 5, :], np.sin(p), atol=5e-5)
    np.testing.assert_allclose(m[79, 5, :], np.sin(p / 10000.0), atol=1e-7)
    np.testing.assert_allclose(m[80, 5, :], np.cos(p), atol=5e-5)
    np.testing.assert_allclose(m[160, :, 7], np.sin(p), atol=5e-5)


@pytest.mark.parametrize("C", [320, TINY.unet.model_channels])
@pytest.mark.parametrize("box", [[10, 30, 50, 100], [0, 0, 128, 128], [100, 5, 128, 17], [64, 127, 65, 128]])
def test_cut_equals_computed_map_of_the_region(C, box):
    y0, x0, y1, x1 = box
    cut = sine.crop_position_map(sine.position_map(C), box, (y1 - y0, x1 - x0))
    assert cut.shape == (1, C, y1 - y0, x1 - x0)
    region = sine.position_map(C, torch.arange(y0 + 1, y1 + 1), torch.arange(x0 + 1, x1 + 1))
    torch.testing.assert_close(cut[0], region)


@pytest.mark.parametrize("size", [(24, 40), (40, 24)])
def test_whole_map_resized_to_any_size(size):
    C, (H, W) = 320, size
    full = sine.position_map(C)
    m = sine.crop_position_map(full, [0, 0, 128, 128], size)
    assert m.shape == (1, C, H, W)
    assert torch.equal(sine.full_position_map(C, size), m)
    x, y = m[0, : C // 2], m[0, C // 2:]
    assert (x - x[:, :1, :]).abs().max() <= 1e-6           # x: constant down each column
    assert ((x.amax(dim=2) - x.amin(dim=2)) > 0).all()     # ... and changes along every row, every channel
    assert (y - y[:, :, :1]).abs().max() <= 1e-6           # y: the reverse
    assert ((y.amax(dim=1) - y.amin(dim=1)) > 0).all()
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):      # align_corners=True keeps the corners
        torch.testing.assert_close(m[0, :, i, j], full[:, i, j])


# ---------------------------------------------------------------------------------------------
# Crops

def test_sample_crop_box_distribution():
    g = torch.Generator().manual_seed(0)
    boxes = np.array([sine.sample_crop_box(g) for _ in range(2000)])
    y0, x0, y1, x1 = boxes.T
    h, w = y1 - y0, x1 - x0
    lo = int(128 * 0.1)  # int(128 * U[0.1, 1)) cells
    for size in (h, w):
        assert size.min() >= lo and size.max() < 128
        assert size.min() <= lo + 8 and size.max() >= 120         # the whole range is reached
        # mean of floor(128 U), U ~ U[0.1, 1): 128 * 0.55 - 1/2, give or take 4 standard errors
        assert abs(size.mean() - (128 * 0.55 - 0.5)) < 4 * 128 * 0.9 / math.sqrt(12 * 2000)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y1 <= 128).all() and (x1 <= 128).all()
    assert len(set(y0)) > 50 and len(set(x0)) > 50                # offsets vary
    assert (h != w).mean() > 0.9                                  # height and width drawn independently


def test_crop_pixels_cuts_the_box_and_resizes():
    canvas = np.zeros((1024, 1024, 3), dtype=np.uint8)
    box = [16, 40, 48, 120]  # [y0, x0, y1, x1] in cells of 8 pixels
    colour = np.array([191, 96, 255], dtype=np.uint8)
    canvas[8 * 16:8 * 48, 8 * 40:8 * 120] = colour
    canvas = Image.fromarray(canvas)
    out = sine.crop_pixels(canvas, box)
    assert out.shape == (1, 3, 512, 512)
    expected = torch.tensor(colour / 127.5 - 1, dtype=torch.float32)
    torch.testing.assert_close(out, expected[None, :, None, None].expand(1, 3, 512, 512))
    # one cell more on any side lets the zeros around the box in
    for bigger in ([15, 40, 48, 120], [16, 39, 48, 120], [16, 40, 49, 120], [16, 40, 48, 121]):
        assert (sine.crop_pixels(canvas, bigger)[:, 0] < expected[0] - 1e-3).any()


def authors_crop(image, crop_box):
    """The authors' data loader (SOURCES.md, canvas and crops): the canvas is the photo resized to 1024 x 1024 with PIL's BICUBIC; the crop
    of box [y0, x0, y1, x1] (cells of 8 pixels) is resized to 512 x 512 with BICUBIC, then scaled
    from 8 bits to [-1, 1]."""
    canvas = image.resize((1024, 1024), resample=Image.BICUBIC)
    y0, x0, y1, x1 = crop_box
    crop = canvas.crop((8 * x0, 8 * y0, 8 * x1, 8 * y1)).resize((512, 512), resample=Image.BICUBIC)
    return torch.from_numpy(np.asarray(crop).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def test_crops_are_resampled_as_the_authors_do():
    """Bicubic, from 8-bit pixels: a bilinear or float resampling differs by more than rounding."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))  # any aspect, noisy
    canvas = sine.make_canvas(photo)
    for box in ([0, 0, 128, 128], [3, 70, 20, 90], [10, 5, 120, 60]):  # shrunk, enlarged, mixed
        torch.testing.assert_close(sine.crop_pixels(canvas, box), authors_crop(photo, box), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The losses

def test_reconstruction_loss_by_hand():
    g = torch.Generator().manual_seed(3)
    x0_pred, z0 = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    t = torch.tensor([50, 900])
    a, b = x0_pred.double().tolist(), z0.double().tolist()
    total = 0.0
    for n in range(2):
        l1 = sum(abs(a[n][c][i][j] - b[n][c][i][j]) for c in range(4) for i in range(3) for j in range(5)) / 60
        total += (int(t[n]) / 1000) ** 2 * l1
    expected = total / 2
    assert sine.reconstruction_loss(x0_pred, z0, t).item() == pytest.approx(expected, rel=1e-5)


def reference_alphas():
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@torch.no_grad()
def test_training_loss_is_mse_plus_reconstruction(setup):
    s = setup
    g = torch.Generator().manual_seed(4)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    context = s["hat1"].expand(2, -1, -1)
    a = torch.tensor(reference_alphas()[t.numpy()], dtype=torch.float32)[:, None, None, None]
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    eps_pred = s["base"](z_t, t, context)
    mse = ((eps_pred - noise) ** 2).mean().item()
    plain = sine.training_loss(s["base"], z0, context, t, noise, alphas_cumprod(), recon_weight=0.0)
    assert plain.item() == pytest.approx(mse, rel=1e-5)

    x0_pred = (z_t - (1 - a).sqrt() * eps_pred) / a.sqrt()
    recon = ((x0_pred - z0).abs().mean(dim=(1, 2, 3)) * (t / 1000.0) ** 2).mean().item()
    full = sine.training_loss(s["base"], z0, context, t, noise, alphas_cumprod(), recon_weight=1.0)
    assert full.item() == pytest.approx(mse + recon, rel=1e-5)
    assert recon > 1e-4 * mse  # the term is really there for the comparison to mean something


# ---------------------------------------------------------------------------------------------
# Prompts

def test_prompts():
    assert sine.training_prompt("a photo of a [*] castle") == "a photo of a sks castle"
    with pytest.raises(ValueError):
        sine.training_prompt("a photo of a castle")
    assert sine.target_prompt("... covered by snow", "a photo of a [*] castle") == "a photo of a castle covered by snow"
    assert sine.target_prompt("a dog", "a [*] dog with a flower in mouth") == "a dog"
    assert sine.target_prompt("painting of a forest", "a painting in the [*] style") == "painting of a forest"


# ---------------------------------------------------------------------------------------------
# The fine-tuned file

def trainable(sd):
    return [p for m in sine.trainable_parts(sd).values() for p in m.parameters()]


def state(sd):
    return {f"{part}.{k}": v.clone() for part, m in sine.trainable_parts(sd).items() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("lr", [1e-4, 1e-6])
def test_finetuned_file_round_trip(base_path, tmp_path, lr):
    sd = load_sd(base_path)
    before = state(sd)
    for m in sine.trainable_parts(sd).values():
        m.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable(sd), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    canvas = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    prompt = "a photo of a [*] castle"
    ids = sd.tokenizer([sine.training_prompt(prompt)])
    full_map = sine.position_map(sd.config.unet.model_channels)
    for _ in range(2):  # as train.py's loop
        loss, _ = sine.step_loss(sd, canvas, ids, True, g, alphas_cumprod(), full_map)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for m in sine.trainable_parts(sd).values():
        m.eval().requires_grad_(False)
    after = state(sd)
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved >= 0.5 * lr  # AdamW's first steps move a weight by about lr: training happened

    path = tmp_path / "ft.safetensors"
    finetuned_file.save_finetuned(str(path), sd, base_path, {"prompt": prompt})
    loaded = finetuned_file.apply_finetuned(load_sd(base_path), str(path))
    fresh = load_sd(base_path)
    restored = state(loaded)
    residual = max((restored[k] - after[k]).abs().max().item() for k in after)
    assert residual <= 0.1 * moved  # the file carried the change, not nothing

    z = torch.randn(LATENT, generator=torch.Generator().manual_seed(1))
    pos = sine.full_position_map(sd.config.unet.model_channels, LATENT[2:])
    with torch.no_grad():
        for t in (900, 300):
            ours = eps(sd.unet, z, t, sd.text_encoder(ids), pos)
            theirs = eps(loaded.unet, z, t, loaded.text_encoder(ids), pos)
            untrained = eps(fresh.unet, z, t, fresh.text_encoder(ids), pos)
            print(f"\nlr {lr:g}, t={t}: file vs memory {rel_err(theirs, ours):.2g}, base vs memory {rel_err(untrained, ours):.2g}")
            assert rel_err(theirs, ours) <= 1e-5
            assert rel_err(untrained, ours) > 1e-5  # else this comparison could not see a lost file

    header = read_header(str(path))
    keys = [k for k in header if k != "__metadata__"]
    assert not any(k.startswith(PREFIXES["vae"]) for k in keys)
    assert set(keys) == {PREFIXES[part] + name for part, name in (k.split(".", 1) for k in after)}
    assert header["__metadata__"]["sine.finetuned"] == "1" and header["__metadata__"]["prompt"] == prompt
    base_header = read_header(base_path)
    fp32_bytes = sum(4 * math.prod(v["shape"]) for k, v in base_header.items()
                     if k.startswith((PREFIXES["unet"], "cond_stage_model.")))
    assert path.stat().st_size < fp32_bytes


# ---------------------------------------------------------------------------------------------
# Memorisation: training and sampling agree
#
# Fine-tuned on one image, a model must then sample that image from noise. That only happens if
# the sampler undoes exactly the noising that training taught (same a_t table, same timesteps,
# eps parameterisation on both sides). The model here is not TINY: sampling from pure noise needs
# eps accurate to a fraction of a percent at t ~ 980 (x0 = (z - sqrt(1 - a) eps) / sqrt(a)
# multiplies its error by ~15 there), and TINY's four-level, 32-channel UNet did not get there in a
# CPU-friendly number of steps (its DDIM samples stayed several times further from the target than
# the target is from zero). A one-level, 64-channel UNet on a 4 x 4 latent does, in seconds.

MEMO = dataclasses.replace(TINY, unet=UNetConfig(model_channels=64, channel_mult=(1,), num_res_blocks=1,
                                                 attention_levels=(0,), num_heads=2, context_dim=64))


def synthetic_latent(size=4):
    """A smooth 'photo' latent (1, 4, size, size) of unit scale, as SD latents are.

    Not the tiny VAE's encoding of a picture: that random VAE gives latents of std ~0.06, and a
    target so close to zero would let a model that samples zeros pass."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([1.5 * xx, -1.2 * yy, 2 * xx * yy - 0.3, torch.cos(3 * xx) + 0.5 * yy])[None]


@torch.no_grad()
def sample_mse(sd, ids, z0, eta, seeds=(10, 11, 12)):
    """Mean squared distance to z0 of DDIM samples (50 steps) by sine's sampler with no guides,
    the UNet as the base, the training prompt, guidance scale 1 (the conditional model alone)."""
    cond, uncond = sd.text_encoder(ids), sd.text_encoder(sd.tokenizer([""]))
    eps_fn = sine.sine_eps(sd.unet, cond, uncond, [], scale=1.0)
    total = 0.0
    for seed in seeds:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
        z = sample(eps_fn, noise, 50, eta=eta, generator=torch.Generator().manual_seed(seed + 100), progress=False)
        total += ((z - z0) ** 2).mean().item()
    return total / len(seeds)


@pytest.mark.full
def test_finetuning_on_one_image_memorises_it(tmp_path):
    path = tmp_path / "memo.safetensors"
    write_checkpoint(path, MEMO, seed=0)
    sd = load_sd(str(path))
    z0 = synthetic_latent()
    energy = (z0 ** 2).mean().item()  # the MSE of a sampler that always returns zeros
    ids = sd.tokenizer([sine.training_prompt("a photo of a [*] castle")])
    before = {eta: sample_mse(sd, ids, z0, eta) for eta in (0.0, 1.0)}

    # Whole-image fine-tuning (no position map, no reconstruction term), as in train.py but with
    # a batch of timesteps per step, a high lr and a cosine decay so that it converges in seconds.
    for m in sine.trainable_parts(sd).values():
        m.train().requires_grad_(True)
    steps, B = 300, 32
    optimizer = torch.optim.AdamW(trainable(sd), lr=3e-3, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    g, alphas = torch.Generator().manual_seed(0), alphas_cumprod()
    for _ in range(steps):
        t = torch.randint(0, 1000, (B,), generator=g)
        noise = torch.randn((B, *z0.shape[1:]), generator=g)
        context = sd.text_encoder(ids).expand(B, -1, -1)
        loss = sine.training_loss(sd.unet, z0.expand(B, -1, -1, -1), context, t, noise, alphas, recon_weight=0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for m in sine.trainable_parts(sd).values():
        m.eval().requires_grad_(False)

    after = {eta: sample_mse(sd, ids, z0, eta) for eta in (0.0, 1.0)}
    print(f"\nmemorisation: target energy {energy:.4f}; sample MSE to the target, before -> after: "
          + ", ".join(f"eta={eta}: {before[eta]:.4g} -> {after[eta]:.4g}" for eta in before))
    for eta in before:
        assert after[eta] < 0.25 * before[eta]
    # Really the image, not just calibrated noise: stochastic sampling (eta=1) corrects the
    # remaining small errors of a briefly trained model and must land on the image; deterministic
    # DDIM (eta=0), which cannot, must still be much closer to it than a blank latent is.
    assert after[1.0] < 0.1 * energy
    assert after[0.0] < 0.5 * energy
