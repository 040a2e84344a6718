"""The checkpoint variants a user is likely to hold all load, and load the right weights.

Error cases (pickles, SD2, truncated files, ...) are in test_hardening.py; agreement with the
reference implementations is in test_model.py.
"""
import pytest
import torch
from safetensors.torch import save_file

from model import load_sd
from model.loader import CONFIG_KEY, PREFIXES
from model.tiny import TINY, random_state_dict

UNET = PREFIXES["unet"]
CLIP = PREFIXES["text_encoder"]


@pytest.fixture(scope="module")
def state():
    return random_state_dict(TINY, seed=3)


def write(path, tensors):
    save_file(tensors, str(path), metadata={CONFIG_KEY: TINY.to_json()})
    return str(path)


def assert_part_equals(module, tensors, prefix):
    loaded = module.state_dict()
    assert loaded.keys() == {k[len(prefix):] for k in tensors if k.startswith(prefix)}
    for key, tensor in tensors.items():
        if key.startswith(prefix):
            assert torch.equal(loaded[key[len(prefix):]], tensor.float()), key


def test_plain_file_loads_every_part_exactly(tmp_path, state):
    sd = load_sd(write(tmp_path / "plain.safetensors", state))
    for part, prefix in PREFIXES.items():
        assert_part_equals(getattr(sd, part), state, prefix)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in sd.unet.parameters())


def test_fp16_file_is_upcast_to_fp32(tmp_path, state):
    half = {k: v.half() for k, v in state.items()}
    sd = load_sd(write(tmp_path / "fp16.safetensors", half))
    assert_part_equals(sd.unet, half, UNET)
    assert "f16" in sd.description


def test_full_file_uses_ema_weights_by_default(tmp_path, state):
    """'Full' files hold the trained weights under model.diffusion_model.* and the EMA weights under
    model_ema.*, with the dots removed from the key; sampling should use the EMA ones."""
    ema = {k: torch.randn_like(v) for k, v in state.items() if k.startswith(UNET)}
    full = dict(state)
    full.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ema.items()})
    full["model_ema.decay"] = torch.tensor(0.9999)
    full["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    path = write(tmp_path / "full.safetensors", full)

    sd = load_sd(path)
    assert_part_equals(sd.unet, ema, UNET)
    assert "EMA" in sd.description and "non-EMA" not in sd.description
    sd = load_sd(path, ema=False)
    assert_part_equals(sd.unet, state, UNET)
    assert "non-EMA" in sd.description


def test_clip_keys_without_text_model(tmp_path, state):
    short = {k.replace(CLIP, "cond_stage_model.transformer."): v for k, v in state.items()}
    assert not any("text_model." in k for k in short)
    sd = load_sd(write(tmp_path / "short-clip.safetensors", short))
    assert_part_equals(sd.text_encoder, state, CLIP)


def test_stored_position_ids_and_schedule_buffers_are_ignored(tmp_path, state):
    """Some files store CLIP's position_ids corrupted as floats; all carry the schedule buffers."""
    extra = dict(state)
    extra[CLIP + "embeddings.position_ids"] = torch.arange(77)[None].float() + 0.37
    extra["betas"] = torch.rand(1000)
    extra["alphas_cumprod"] = torch.rand(1000)
    sd = load_sd(write(tmp_path / "extra.safetensors", extra))
    assert_part_equals(sd.text_encoder, state, CLIP)
    ids = sd.tokenizer(["a photo of a sks castle"])
    clean = load_sd(write(tmp_path / "clean.safetensors", state))
    with torch.no_grad():
        assert torch.equal(sd.text_encoder(ids), clean.text_encoder(ids))


def test_loaded_parameters_are_not_meta_and_share_no_storage_with_each_other(tmp_path, state):
    """load_sd builds on the meta device and assigns the file's tensors: nothing may stay on meta."""
    sd = load_sd(write(tmp_path / "plain.safetensors", state))
    tensors = [t for m in (sd.unet, sd.vae, sd.text_encoder) for t in (*m.parameters(), *m.buffers())]
    assert all(t.device.type == "cpu" for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
