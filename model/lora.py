"""Low-rank adapters (LoRA, Hu et al. 2021): fine-tune a frozen layer through a small side path.

    y = W x + (alpha / rank) * B (A x)          A: (rank, in), B: (out, rank)

W stays as the base has it. Only A and B learn, far fewer numbers than W: a file of megabytes, and
no AdamW moments for W, which is what lets SINE's fine-tuning fit a small GPU. B starts at zero, so
until the first step the adapted model computes exactly what the base does.

A hangs on the layer it adapts as `lora_down` and B as `lora_up` (the names kohya's LoRA files use),
and a forward hook adds their path to the layer's output: the layer's own weights keep their
checkpoint keys, and `merge` folds B A into W for sampling at full speed. A convolution gets A as a
convolution of its own kernel and stride, B as a 1 x 1 one.
"""
import math

import torch
import torch.nn as nn

# Which layers are adapted: every attention projection, in the UNet and the text encoder, and the
# convolutions next to the position map's entry, through which the map must learn to speak. On the
# toy world, adapters on attention alone kept far less of the photo's layout (toy/README.md).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def map_convs(unet):
    """The UNet's convolutions around the position map: the first conv (the map is added to its
    output), and those that read that sum, the first ResBlock's and, through the skip, the last one's."""
    last = f"output_blocks.{len(unet.output_blocks) - 1}.0"
    names = ["input_blocks.0.0", "input_blocks.1.0.in_layers.2", f"{last}.in_layers.2", f"{last}.skip_connection"]
    return [name for name in names if isinstance(unet.get_submodule(name), nn.Conv2d)]


def lora_targets(sd, convs=True):
    """{part: [layer names]} of the layers that get adapters."""
    targets = {part: [name for name, _ in getattr(sd, part).named_modules() if name.endswith(ATTENTION)]
               for part in ("unet", "text_encoder")}
    if convs:
        targets["unet"] += map_convs(sd.unet)
    return targets


def side_path(layer, rank, generator=None):
    """(A, B) for a Linear or a Conv2d layer: A's init is nn.Linear's own, B's is zero."""
    if isinstance(layer, nn.Linear):
        down = nn.Linear(layer.in_features, rank, bias=False)
        up = nn.Linear(rank, layer.out_features, bias=False)
    else:
        down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
        up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5), generator=generator)
    nn.init.zeros_(up.weight)
    return down.to(layer.weight), up.to(layer.weight)


def add_side_path(layer, inputs, output):
    return output + layer.lora_up(layer.lora_down(inputs[0])) * layer.lora_scale


def add_lora(module, names, rank, alpha=None, generator=None):
    """Adapt module's layers `names` in place, with alpha = rank unless given (a scale of 1); generator
    draws A. Returns the adapters' parameters, in a fixed order: the only ones that should learn."""
    params = []
    for name in names:
        layer = module.get_submodule(name)
        layer.lora_down, layer.lora_up = side_path(layer, rank, generator)
        layer.lora_scale = (alpha or rank) / rank
        layer.lora_hook = layer.register_forward_hook(add_side_path)
        params += [layer.lora_down.weight, layer.lora_up.weight]
    return params


def adapt(sd, rank, convs=True, generator=None):
    """Freeze sd's UNet and text encoder and adapt the layers of lora_targets; returns the adapters'
    parameters (A drawn by generator, the UNet's first)."""
    params = []
    for part, names in lora_targets(sd, convs).items():
        params += add_lora(getattr(sd, part).requires_grad_(False), names, rank, generator=generator)
    return params


def delta(up, down, scale, shape):
    """B A, scaled, in W's shape: what the side path adds to W."""
    product = up.flatten(1) @ down.flatten(1)                    # (out, in * kh * kw)
    return (product * scale).view(shape)


@torch.no_grad()
def merge(module):
    """Fold every adapter of module into its layer's weight and remove it: a plain model again."""
    for layer in module.modules():
        if hasattr(layer, "lora_hook"):
            up, down = layer.lora_up.weight, layer.lora_down.weight
            layer.weight += delta(up, down, layer.lora_scale, layer.weight.shape).to(layer.weight)
            layer.lora_hook.remove()
            del layer.lora_down, layer.lora_up, layer.lora_scale, layer.lora_hook
    return module


def adapters(module):
    """{layer name: layer} of module's adapted layers."""
    return {name: layer for name, layer in module.named_modules() if hasattr(layer, "lora_hook")}
