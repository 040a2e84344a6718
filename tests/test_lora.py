"""train.py --lora (model/lora.py): adapters that start as the base, learn, save, merge, and export
to kohya's layout, which diffusers' own LoRA loading reads."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import finetuned_file
import sine
from model import SDConfig, UNet, load_sd, lora
from model.schedule import alphas_cumprod
from model.tiny import TINY
from test_model import reference_clip, reference_unet, rel_err, token_ids, unconfigured_unet
from test_sine import base_path, one_thread  # noqa: F401 (fixtures: a tiny checkpoint, one thread)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a [*] castle"
TOL = 1e-5  # max|ours - diffusers| / max|diffusers|


def weights(sd):
    return {f"{part}.{k}": v.clone() for part, m in sine.trainable_parts(sd).items() for k, v in m.state_dict().items()}


def merged(sd):
    for module in sine.trainable_parts(sd).values():
        lora.merge(module)
    return sd


def adapted(base_path, rank=4, convs=True):
    """The tiny model with adapters on the layers train.py --lora picks; returns (model, their parameters)."""
    sd = load_sd(base_path)
    for module in sine.trainable_parts(sd).values():
        module.train().requires_grad_(False)
    params = []
    for part, names in lora.lora_targets(sd, convs).items():
        params += lora.add_lora(getattr(sd, part), names, rank, generator=torch.Generator().manual_seed(0))
    return sd, params


def one_step(sd, params, seed=0):
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    canvas = sine.make_canvas(Image.new("RGB", (96, 64), (200, 40, 40)), sine.sizes_for(sd.config))
    ids = sd.tokenizer([sine.training_prompt(PROMPT)])
    full_map = sine.position_map(sd.config.unet.model_channels, sizes=sine.sizes_for(sd.config))
    loss, _ = sine.step_loss(sd, canvas, ids, True, torch.Generator().manual_seed(seed), alphas_cumprod(), full_map,
                             sizes=sine.sizes_for(sd.config))
    loss.backward()
    optimizer.step()


def test_targets_are_attention_and_the_convs_around_the_map(base_path):
    sd = load_sd(base_path)
    targets = lora.lora_targets(sd)
    unet_attention = [n for n in targets["unet"] if ".attn" in n]
    attention_blocks = sum(1 for n, _ in sd.unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert len(unet_attention) == attention_blocks * 2 * 4  # self and cross, q k v out
    assert len(targets["text_encoder"]) == TINY.text_encoder.layers * 4
    assert [n for n in targets["unet"] if ".attn" not in n] == [
        "input_blocks.0.0", "input_blocks.1.0.in_layers.2", f"output_blocks.{len(sd.unet.output_blocks) - 1}.0.in_layers.2",
        f"output_blocks.{len(sd.unet.output_blocks) - 1}.0.skip_connection"]
    assert not [n for n in lora.lora_targets(sd, convs=False)["unet"] if ".attn" not in n]


def test_adapters_start_as_the_base_bitwise_and_move_it_after_one_step(base_path, one_thread):
    base = weights(load_sd(base_path))
    sd, params = adapted(base_path)
    assert all(torch.equal(base[k], v) for k, v in weights(merged(sd)).items() if "lora_" not in k)
    assert weights(sd).keys() == base.keys(), "merge leaves a plain model, with the checkpoint's keys"

    sd, params = adapted(base_path)
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    ids = token_ids(TINY.text_encoder.vocab_size, batch=1)
    with torch.no_grad():
        plain = load_sd(base_path)
        assert torch.equal(sd.unet(z, t, sd.text_encoder(ids)), plain.unet(z, t, plain.text_encoder(ids)))
    one_step(sd, params)
    moved = weights(sd)
    assert all(torch.equal(base[k], v) for k, v in moved.items() if "lora_" not in k), "the base stays frozen"
    after = weights(merged(sd))
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)
    assert all(".to_" in k or "_proj" in k or "input_blocks.0.0" in k or ".0.in_layers.2" in k
               or "skip_connection" in k for k in changed), "only adapted layers change"


def test_the_file_holds_the_adapters_alone_and_merges_to_the_trained_model(base_path, tmp_path, one_thread):
    sd, params = adapted(base_path, rank=2)
    one_step(sd, params)
    path = str(tmp_path / "lora.safetensors")
    finetuned_file.save_finetuned(path, sd, base_path, {"prompt": PROMPT})
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["lora_rank"] == "2" and f.metadata()["lora_alpha"] == "2.0"
        assert len(list(f.keys())) == len(params)
        assert all(".lora_down." in k or ".lora_up." in k for k in f.keys())
    assert os.path.getsize(path) < sum(p.numel() for p in params) * 4 + 100_000
    expected = weights(merged(sd))
    loaded = weights(finetuned_file.apply_finetuned(load_sd(base_path), path))
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_a_lora_file_with_nan_is_refused_as_a_full_one_is(base_path, tmp_path, one_thread):
    """A diverged adapter would turn every merged weight it touches into nan: edit.py must say so, not
    render noise. The message is apply_finetuned's for full files (test_hardening runs it through edit.py)."""
    from safetensors.torch import load_file, save_file
    sd, params = adapted(base_path, rank=2)
    one_step(sd, params)
    path, broken = str(tmp_path / "lora.safetensors"), str(tmp_path / "broken.safetensors")
    finetuned_file.save_finetuned(path, sd, base_path, {"prompt": PROMPT})
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = sorted(k for k in tensors if ".lora_up." in k)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, broken, metadata=metadata)
    with pytest.raises(ValueError, match=f"broken.safetensors holds nan or inf values \\({key}\\)"):
        finetuned_file.apply_finetuned(load_sd(base_path), broken)


def test_export_loads_in_diffusers_and_matches_our_merged_model(base_path, tmp_path, one_thread):
    """export.py --lora, loaded by diffusers' own kohya conversion and PEFT onto diffusers' UNet and
    transformers' CLIP (the same tiny base), gives our merged model's outputs."""
    from diffusers import StableDiffusionPipeline

    sd, params = adapted(base_path, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))  # B too: every path counts
    finetuned = str(tmp_path / "lora.safetensors")
    finetuned_file.save_finetuned(finetuned, sd, base_path, {"prompt": PROMPT, "steps": 1, "planned_steps": 1})
    exported = str(tmp_path / "kohya.safetensors")
    subprocess.run([sys.executable, "export.py", finetuned, "--lora", "--fp32", "--base", base_path, "--out", exported],
                   cwd=REPO, check=True, capture_output=True)

    with safe_open(exported, framework="pt") as f:  # what AUTOMATIC1111 reads: the base's version, the tags
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert "sks" in json.loads(metadata["ss_tag_frequency"])["sine"]

    unet, clip = reference_unet(TINY.unet, base_path), reference_clip(TINY.text_encoder, base_path)
    state, alphas = StableDiffusionPipeline.lora_state_dict(exported)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, clip)
    ours = lora.merge(sd.unet.eval()), lora.merge(sd.text_encoder.eval())

    ids = token_ids(TINY.text_encoder.vocab_size)
    z = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([37, 861])
    with torch.no_grad():
        context, reference_context = ours[1](ids), clip(ids).last_hidden_state
        assert rel_err(context, reference_context) < TOL
        eps = ours[0](z, t, context)
        assert rel_err(eps, unet(z, t, context).sample) < TOL
        base = load_sd(base_path)
        assert rel_err(context, base.text_encoder(ids)) > 1000 * TOL, "the adapters changed nothing"
        assert rel_err(eps, base.unet(z, t, context)) > 1000 * TOL, "the adapters changed nothing"


@pytest.mark.parametrize("config", [TINY, SDConfig()], ids=["tiny", "sd-v1"])
def test_kohya_names_are_diffusers_module_paths_at_every_size(config):
    """export.py's renaming, checked against diffusers' UNet itself for every layer that --lora adapts
    (SD v1 has attention at a level that the tiny model lacks)."""
    import export
    with torch.device("meta"):
        ours = UNet(config.unet)
    theirs = unconfigured_unet(config.unet)
    names = [n for n, _ in ours.named_modules() if n.endswith(lora.ATTENTION)] + lora.map_convs(ours)
    wrong = [n for n in names if theirs.get_submodule(export.diffusers_path(n, config.unet.num_res_blocks)).weight.shape
             != ours.get_submodule(n).weight.shape]
    assert not wrong, wrong[:5]
    if config == SDConfig():
        assert len(names) == 16 * 2 * 4 + 4  # 16 transformer blocks, self and cross attention, q k v out; 4 convs
