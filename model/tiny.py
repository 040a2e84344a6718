"""Write a randomly initialised checkpoint in the exact SD v1 file layout, small or full size.

    python -m model.tiny weights/tiny.safetensors          # ~10 MB, seconds on a CPU
    python -m model.tiny --full /tmp/random-sd.safetensors # SD v1 size (4 GB), for tests

The real weights are a 4 GB download, so tests run on these. (The README's one-minute check runs on
another small file, the toy base that toy/ trains: weights/toy-base.safetensors.)
A tiny file records its config in the safetensors metadata; `load_sd` reads it from there. Its
native size is 128 pixels, not 512: train.py cuts 128-pixel crops from a 256-pixel canvas, and
edit.py's default size has 128 on the short side. Its pictures are noise: the point is that every
code path runs and every shape is right.
"""
import argparse
import math

import torch
from safetensors.torch import save_file

from .clip import CLIPConfig, TextEncoder
from .loader import CONFIG_KEY, PREFIXES, SDConfig
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

# Widths are multiples of 32 because every GroupNorm has 32 groups. The VAE keeps four levels so
# that latents stay 1/8 of the image, as in SD v1; the UNet keeps four levels so that sizes must
# be multiples of 64 pixels, as in SD v1.
TINY = SDConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), attention_levels=(1, 2),
                    num_heads=2, context_dim=64),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    text_encoder=CLIPConfig(width=64, layers=2, heads=2, mlp_width=128),
    image_size=128,  # crops of 128 pixels, not SD v1's 512: the same code paths, 16 times fewer pixels
)


def random_state_dict(config: SDConfig, seed=0):
    """Every tensor of the file, keyed as in SD v1, with random values.

    Matrices and conv kernels get N(0, 1/fan_in), which keeps activations at a sane scale through
    the deep UNet. Norm weights get 1 + N(0, 0.1^2) and biases N(0, 0.1^2) rather than PyTorch's
    constant 1 and 0: then a swapped or misplaced weight changes the output, and a parity test sees it.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        parts = {"unet": UNet(config.unet), "vae": VAE(config.vae), "text_encoder": TextEncoder(config.text_encoder)}
    state = {}
    for part, module in parts.items():
        for name, meta in module.state_dict().items():
            tensor = torch.randn(meta.shape, generator=generator)
            if meta.dim() > 1:
                tensor /= math.sqrt(meta[0].numel())  # fan_in: everything but the output dimension
            else:
                tensor = tensor * 0.1 + (1.0 if name.endswith("weight") else 0.0)
            state[PREFIXES[part] + name] = tensor
    return state


def write_checkpoint(path, config: SDConfig, seed=0, dtype=torch.float32, record_config=True):
    state = {k: v.to(dtype) for k, v in random_state_dict(config, seed).items()}
    save_file(state, path, metadata={CONFIG_KEY: config.to_json()} if record_config else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .safetensors file")
    parser.add_argument("--full", action="store_true", help="SD v1 size instead of tiny (4 GB, slow)")
    parser.add_argument("--fp16", action="store_true", help="store the weights as fp16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_checkpoint(args.out, SDConfig() if args.full else TINY, args.seed,
                     torch.float16 if args.fp16 else torch.float32, record_config=not args.full)
    print(args.out)  # like train.py and edit.py: stdout holds only the paths written


if __name__ == "__main__":
    main()
