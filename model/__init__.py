"""Stable Diffusion v1 in plain PyTorch. Read in the README's order: unet.py and attention.py,
schedule.py and ddim.py, clip.py and tokenizer.py, vae.py, then loader.py (how the checkpoint file
maps onto the modules)."""
from .clip import CLIPConfig, TextEncoder
from .loader import CheckpointError, SDConfig, StableDiffusion, load_sd, read_header
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import LATENT_SCALE, VAE, VAEConfig
