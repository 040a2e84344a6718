"""Our SD v1 modules against the reference implementations: diffusers (UNet, VAE), transformers (CLIP).

Each part is loaded by our `model.load_sd` from a random checkpoint in the real SD v1 file layout,
and the reference module is loaded from the SAME file through diffusers' own key conversion, so the
tests check the file layout and the maths together. They run at the tiny size and at full SD v1
size (test ids containing `full`; `-k "not full"` skips them), from an fp32 and an fp16 file.

Then the details that ports most often get wrong, one small test each: GroupNorm eps, the VAE's
asymmetric downsample padding, the GEGLU chunk order, where SINE's `pos` enters the UNet, and
that the SDPA fast path in model/attention.py computes the same as the plain formula.

The full-size files are 4.3 GB (fp32) and 2.1 GB (fp16): they are written once per session, and
only one full model of a kind is held in memory at a time.
"""
import copy
import gc
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.models.activations import GEGLU as ReferenceGEGLU
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import model
import model.attention
from model.loader import PREFIXES
from model.tiny import TINY, random_state_dict, write_checkpoint
from model.unet import GEGLU, GroupNorm32, ResBlock, SpatialTransformer
from model.vae import Downsample as VAEDownsample

TOL = 2e-5         # max|ours - ref| / max|ref|, for every part, size and file dtype
SDPA_TOL = 1e-5    # fused attention against the plain formula
LATENT = (16, 24)  # non-square at every UNet level (down to 2x3), so a swapped height/width shows;
                   # small, so that full size stays fast. The image is 8x that: 128x192.
TIMESTEPS = [37, 861]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BOS, EOS = 49406, 49407


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Checkpoint files

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(size, dtype) -> path of a random SD v1 layout file, written on first use.

    Tiny files record their config in the metadata; full-size files have none, which means SD v1.
    """
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}

    def get(size, dtype):
        if (size, dtype) in paths:
            return paths[size, dtype]
        if size == "tiny":
            path = folder / f"tiny-{dtype}.safetensors"
            write_checkpoint(path, TINY, seed=0, dtype=DTYPES[dtype], record_config=True)
            paths[size, dtype] = path
        else:
            # What write_checkpoint(path, SDConfig(), 0, dtype, record_config=False) writes, but the
            # 1.07 B random numbers (about a minute on 2 cores) are drawn once for both files.
            state = random_state_dict(model.SDConfig(), seed=0)
            for name in ("fp32", "fp16"):
                for key in state:  # convert in place, so fp32 and fp16 copies never coexist
                    state[key] = state[key].to(DTYPES[name])
                paths["full", name] = folder / f"full-{name}.safetensors"
                save_file(state, paths["full", name])
            del state
            gc.collect()
        return paths[size, dtype]

    yield get
    for path in paths.values():  # 6.4 GB: do not leave them in pytest's kept temp folders
        path.unlink(missing_ok=True)


def read_part(path, prefix):
    """The file's tensors under `prefix` (keys kept), upcast to fp32: what the reference loads."""
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key).float() for key in f.keys() if key.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# The reference modules, configured like our configs and loaded from the same file

def _assign(module, state):
    module.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in module.state_dict().values())
    return module.eval()


def unconfigured_unet(cfg):
    """diffusers' UNet in cfg's sizes, on the meta device: no weights yet."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    levels = range(len(widths))
    with torch.device("meta"):  # skip the random init of 860 M parameters; the file fills them
        return UNet2DConditionModel(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=widths,
            down_block_types=["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels],
            up_block_types=["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels)],
            layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
            attention_head_dim=cfg.num_heads)  # diffusers' historical name for the number of heads


def reference_unet(cfg, path):
    ref = unconfigured_unet(cfg)
    return _assign(ref, convert_ldm_unet_checkpoint(read_part(path, PREFIXES["unet"]), dict(ref.config)))


def reference_vae(cfg, path):
    with torch.device("meta"):
        ref = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.z_channels,
            block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
            down_block_types=["DownEncoderBlock2D"] * len(cfg.ch_mult),
            up_block_types=["UpDecoderBlock2D"] * len(cfg.ch_mult))
    return _assign(ref, convert_ldm_vae_checkpoint(read_part(path, PREFIXES["vae"]), dict(ref.config)))


def reference_clip(cfg, path):
    # Built for real, not on the meta device: its position_ids buffer is not in the state dict.
    ref = CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_width,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS))
    prefix = PREFIXES["text_encoder"]
    state = {k[len(prefix):]: v for k, v in read_part(path, prefix).items() if not k.endswith("position_ids")}
    return _assign(ref, state)


def token_ids(vocab_size, batch=2):
    """Prompt-like ids: BOS, a few random tokens (a different count per row), EOS padding to 77."""
    ids = torch.full((batch, 77), EOS)
    ids[:, 0] = BOS
    for row, length in enumerate(range(5, 5 + 9 * batch, 9)):
        ids[row, 1:1 + length] = torch.randint(0, min(vocab_size, BOS), (length,))
    return ids


# ---------------------------------------------------------------------------------------------
# 1. Whole-part parity: tiny and full size, fp32 and fp16 files

@dataclass
class Case:
    size: str
    dtype: str
    path: object
    ours: model.StableDiffusion


# Module scope: pytest groups the tests by case, and drops one case's model before loading the next.
@pytest.fixture(scope="module", params=["tiny-fp32", "tiny-fp16", pytest.param("full-fp32", marks=pytest.mark.full),
                                        pytest.param("full-fp16", marks=pytest.mark.full)])
def case(request, checkpoint):
    size, dtype = request.param.split("-")
    path = checkpoint(size, dtype)
    ours = model.load_sd(path)  # dtype fp32 (the default), also from the fp16 file
    assert all(p.dtype == torch.float32 for part in (ours.unet, ours.vae, ours.text_encoder)
               for p in part.parameters())
    if size == "full":
        assert ours.config == model.SDConfig()  # no config in the file means SD v1
    yield Case(size, dtype, path, ours)
    del ours
    gc.collect()


def test_unet_matches_diffusers(case):
    cfg = case.ours.config.unet
    ref = reference_unet(cfg, case.path)
    torch.manual_seed(0)
    x = torch.randn(2, cfg.in_channels, *LATENT)
    t = torch.tensor(TIMESTEPS)
    context = torch.randn(2, 77, cfg.context_dim)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        del ref
        gc.collect()
        got = case.ours.unet(x, t, context)  # pos=None: plain SD
    assert got.shape == (2, cfg.out_channels, *LATENT)
    assert rel_err(got, expected) <= TOL


def test_vae_encode_matches_diffusers(case):
    ref = reference_vae(case.ours.config.vae, case.path)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 8 * LATENT[0], 8 * LATENT[1]) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        del ref
        gc.collect()
        mean, logvar = case.ours.vae.encode(images)
    assert mean.shape == logvar.shape == (2, 4, *LATENT)
    # Guard against a vacuous pass: most logvars must lie inside the clamp range [-30, 20].
    assert ((posterior.logvar > -30) & (posterior.logvar < 20)).float().mean() > 0.5
    assert rel_err(mean, posterior.mean) <= TOL
    assert rel_err(logvar, posterior.logvar) <= TOL


def test_vae_decode_matches_diffusers(case):
    ref = reference_vae(case.ours.config.vae, case.path)
    torch.manual_seed(2)
    latents = torch.randn(2, 4, *LATENT)
    with torch.no_grad():
        expected = ref.decode(latents).sample
        del ref
        gc.collect()
        got = case.ours.vae.decode(latents)
    assert got.shape == (2, 3, 8 * LATENT[0], 8 * LATENT[1])
    assert rel_err(got, expected) <= TOL


def test_text_encoder_matches_transformers(case):
    cfg = case.ours.config.text_encoder
    ref = reference_clip(cfg, case.path)
    torch.manual_seed(3)
    ids = token_ids(cfg.vocab_size)
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = case.ours.text_encoder(ids)
    assert got.shape == (2, 77, cfg.width)
    assert rel_err(got, expected) <= TOL


# ---------------------------------------------------------------------------------------------
# 2. Details that ports get wrong (tiny models; the references loaded from the same tiny file)

@pytest.fixture(scope="session")
def tiny(checkpoint):
    path = checkpoint("tiny", "fp32")
    ours = model.load_sd(path)
    return ours, reference_unet(ours.config.unet, path), reference_vae(ours.config.vae, path)


def test_groupnorm_eps_attributes(tiny):
    ours, ref_unet, ref_vae = tiny
    # Where SD v1 puts which eps: VAE 1e-6 everywhere; UNet 1e-5 in ResBlocks and `out.0`,
    # 1e-6 in the SpatialTransformer's `norm`. Every GroupNorm must be one of these.
    vae_norms = [m for m in ours.vae.modules() if isinstance(m, nn.GroupNorm)]
    assert vae_norms and all(m.eps == 1e-6 for m in vae_norms)
    expected = {}
    for name, m in ours.unet.named_modules():
        if isinstance(m, ResBlock):
            expected[id(m.in_layers[0])] = expected[id(m.out_layers[0])] = 1e-5
        elif isinstance(m, SpatialTransformer):
            expected[id(m.norm)] = 1e-6
    expected[id(ours.unet.out[0])] = 1e-5
    unet_norms = [m for m in ours.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert len(unet_norms) == len(expected)
    assert all(isinstance(m, GroupNorm32) and m.eps == expected[id(m)] for m in unet_norms)

    # And each GroupNorm has the eps of the reference's GroupNorm that holds the same (random) weights.
    for ours_part, ref_part in ((ours.unet, ref_unet), (ours.vae, ref_vae)):
        ref_eps = {m.weight.detach().numpy().tobytes(): m.eps for m in ref_part.modules() if isinstance(m, nn.GroupNorm)}
        norms = [m for m in ours_part.modules() if isinstance(m, nn.GroupNorm)]
        assert len(ref_eps) == len(norms)
        for m in norms:
            assert m.eps == ref_eps[m.weight.numpy().tobytes()]


def _eps_blocks(ours, ref_unet, ref_vae):
    """name -> (our block, its forward, the reference block, its forward, input channels)."""
    torch.manual_seed(4)
    emb = torch.randn(2, 4 * ours.config.unet.model_channels)
    context = torch.randn(2, 77, ours.config.unet.context_dim)
    level = ours.config.unet.attention_levels[0]
    first_attn = 1 + 3 * level  # input_blocks: conv, then (2 res [+ attn], downsample) per level
    width = ours.config.unet.model_channels * ours.config.unet.channel_mult[level]
    mc, ch = ours.config.unet.model_channels, ours.config.vae.ch
    return {
        "unet-resblock": (ours.unet.input_blocks[1][0], lambda m, x: m(x, emb),
                          ref_unet.down_blocks[0].resnets[0], lambda m, x: m(x, emb), mc),
        "unet-transformer": (ours.unet.input_blocks[first_attn][1], lambda m, x: m(x, context),
                             ref_unet.down_blocks[level].attentions[0],
                             lambda m, x: m(x, encoder_hidden_states=context, return_dict=False)[0], width),
        "unet-out": (ours.unet.out, lambda m, x: m(x),
                     ref_unet, lambda m, x: m.conv_out(m.conv_act(m.conv_norm_out(x))), mc),
        "vae-resblock": (ours.vae.encoder.down[0].block[0], lambda m, x: m(x),
                         ref_vae.encoder.down_blocks[0].resnets[0], lambda m, x: m(x, None), ch),
        "vae-attention": (ours.vae.encoder.mid.attn_1, lambda m, x: m(x),
                          ref_vae.encoder.mid_block.attentions[0], lambda m, x: m(x), ch * ours.config.vae.ch_mult[-1]),
    }


@pytest.mark.parametrize("block", ["unet-resblock", "unet-transformer", "unet-out", "vae-resblock", "vae-attention"])
def test_groupnorm_eps_behaviour(tiny, block):
    """On an input whose group variance (~1e-5) is near eps, ours matches the reference, and the
    same block with the other eps (1e-5 <-> 1e-6) would not: so the parity tests can see eps."""
    ours_block, ours_fn, ref_block, ref_fn, channels = _eps_blocks(*tiny)[block]
    torch.manual_seed(5)
    x = 3e-3 * torch.randn(2, channels, 6, 10)
    wrong = copy.deepcopy(ours_block)
    for m in wrong.modules():
        if isinstance(m, nn.GroupNorm):
            m.eps = 1e-5 if m.eps == 1e-6 else 1e-6
    with torch.no_grad():
        expected = ref_fn(ref_block, x)
        assert rel_err(ours_fn(ours_block, x), expected) <= TOL
        assert rel_err(ours_fn(wrong, x), expected) > 100 * TOL


def test_vae_downsample_pads_right_and_bottom_only(tiny):
    ours, _, ref_vae = tiny
    torch.manual_seed(6)
    down = VAEDownsample(8)
    x = torch.randn(2, 8, 12, 20)
    w, b = down.conv.weight, down.conv.bias
    with torch.no_grad():
        got = down(x)
        by_hand = F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2)
        symmetric = F.conv2d(x, w, b, stride=2, padding=1)  # same output shape, shifted window
        assert got.shape == symmetric.shape == (2, 8, 6, 10)
        assert rel_err(got, by_hand) <= TOL
        assert rel_err(symmetric, by_hand) > 0.1
        # and the loaded tiny VAE's downsample agrees with diffusers' (padding=0 + asymmetric pad)
        x = torch.randn(2, ours.config.vae.ch, 12, 20)
        expected = ref_vae.encoder.down_blocks[0].downsamplers[0](x)
        assert rel_err(ours.vae.encoder.down[0].downsample(x), expected) <= TOL


def test_unet_downsample_pads_symmetrically(tiny):
    """Unlike the VAE, the UNet's downsample is a plain stride-2 conv with padding 1."""
    ours, _, _ = tiny
    down = ours.unet.input_blocks[3][0]  # the first Downsample
    torch.manual_seed(7)
    x = torch.randn(2, ours.config.unet.model_channels, 12, 20)
    w, b = down.op.weight, down.op.bias
    with torch.no_grad():
        got = down(x)
        assert rel_err(got, F.conv2d(x, w, b, stride=2, padding=1)) <= TOL
        assert rel_err(got, F.conv2d(F.pad(x, (0, 1, 0, 1)), w, b, stride=2)) > 0.1


def test_geglu_value_first_gate_second():
    torch.manual_seed(8)
    dim, inner = 16, 32
    ours = GEGLU(dim, inner)
    x = torch.randn(2, 5, dim)
    gelu = lambda g: 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))  # exact GELU, written out
    with torch.no_grad():
        h = x @ ours.proj.weight.T + ours.proj.bias
        value, gate = h[..., :inner], h[..., inner:]  # the first half of proj's rows is the value
        got = ours(x)
        assert rel_err(got, value * gelu(gate)) <= TOL
        assert rel_err(got, gate * gelu(value)) > 0.1  # the swapped order
        assert rel_err(got, value * F.gelu(gate, approximate="tanh")) > TOL  # nor the tanh GELU
        ref = ReferenceGEGLU(dim, inner)
        ref.load_state_dict(ours.state_dict())
        assert rel_err(got, ref(x)) <= TOL


def test_vae_logvar_is_clamped(tiny):
    """logvar is clamped to [-30, 20]. Random weights keep it inside that range, so the parity test
    cannot see the clamp: here the same large factor on both quant_convs pushes it out."""
    ours, _, ref_vae = tiny
    ours_vae, ref_vae = copy.deepcopy(ours.vae), copy.deepcopy(ref_vae)
    with torch.no_grad():
        for conv in (ours_vae.quant_conv, ref_vae.quant_conv):
            conv.weight *= 1000
            conv.bias *= 1000
        torch.manual_seed(11)
        images = torch.rand(2, 3, 8 * LATENT[0], 8 * LATENT[1]) * 2 - 1
        expected = ref_vae.encode(images).latent_dist.logvar
        _, logvar = ours_vae.encode(images)
    clamped = (expected == 20) | (expected == -30)
    assert (expected == 20).any() and (expected == -30).any()
    # Where the reference clamps, ours must give exactly the bound. (Elsewhere the x1000 weights
    # amplify fp32 rounding far beyond the parity tolerance; plain parity is tested above.)
    assert torch.equal(logvar[clamped], expected[clamped])
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_unet_pos_is_added_after_the_first_conv(tiny):
    """SINE's position map: pos=0 is plain SD, and pos is added to the output of input_blocks.0,
    which is diffusers' conv_in (checked by adding it there with a forward hook)."""
    ours, ref_unet, _ = tiny
    cfg = ours.config.unet
    torch.manual_seed(9)
    x = torch.randn(2, cfg.in_channels, *LATENT)
    t = torch.tensor(TIMESTEPS)
    context = torch.randn(2, 77, cfg.context_dim)
    pos = torch.randn(1, cfg.model_channels, *LATENT)  # one map for the whole batch
    hook = ref_unet.conv_in.register_forward_hook(lambda module, inputs, output: output + pos)
    try:
        with torch.no_grad():
            expected = ref_unet(x, t, encoder_hidden_states=context).sample
    finally:
        hook.remove()
    with torch.no_grad():
        plain = ours.unet(x, t, context)
        assert torch.equal(ours.unet(x, t, context, pos=torch.zeros_like(pos)), plain)
        with_pos = ours.unet(x, t, context, pos=pos)
    assert rel_err(with_pos, plain) > 0.01
    assert rel_err(with_pos, expected) <= TOL


# ---------------------------------------------------------------------------------------------
# 3. The fused attention computes the same as the plain formula

def test_sdpa_fast_path_matches_plain_attention(tiny, monkeypatch):
    ours = tiny[0]
    calls = []
    fused = F.scaled_dot_product_attention

    def counted(*args, **kwargs):  # to check that the flag really switches paths
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    torch.manual_seed(10)
    cfg = ours.config.unet
    x = torch.randn(2, cfg.in_channels, *LATENT)
    context = torch.randn(2, 77, cfg.context_dim)
    ids = token_ids(ours.config.text_encoder.vocab_size)
    latents = torch.randn(2, 4, *LATENT)

    def run():
        with torch.no_grad():
            return (ours.unet(x, torch.tensor(TIMESTEPS), context), ours.text_encoder(ids),
                    ours.vae.decode(latents))

    monkeypatch.setattr(model.attention, "USE_SDPA", True)
    fast = run()
    assert calls
    calls.clear()
    monkeypatch.setattr(model.attention, "USE_SDPA", False)
    plain = run()
    assert not calls
    for name, a, b in zip(("unet", "text encoder", "vae decode"), fast, plain):
        assert rel_err(a, b) <= SDPA_TOL, name
