"""The toy base model: SD v1's three parts, made small, for 64 x 64 toy scenes.

Same code, same file layout, other sizes, recorded in the file's metadata as model.tiny does. The
VAE halves the image twice, not three times: a 64 x 64 scene becomes a 16 x 16 latent, so that
shapes keep their outlines. The UNet has three levels (16, 8, 4 latent pixels), attention on the
lower two. The text encoder is a two-layer CLIP, 32 wide; it keeps CLIP's tokenizer and its 49,408-word
table, of which the toy captions use a dozen words.
"""
import os

import cli
from model.clip import CLIPConfig
from model.loader import SDConfig
from model.unet import UNetConfig
from model.vae import VAEConfig

from .world import SIZE

TOY = SDConfig(
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                    num_heads=4, context_dim=32),
    vae=VAEConfig(ch=128, ch_mult=(1, 1, 1), num_res_blocks=0),
    text_encoder=CLIPConfig(width=32, layers=2, heads=2, mlp_width=128),
    image_size=SIZE,
)
TOY_BASE = os.path.join("weights", cli.TOY_BASE)  # relative to the repository, as users type it
