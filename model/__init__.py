"""Stable Diffusion v1 in plain PyTorch. Read in this order: unet.py, clip.py, vae.py,
schedule.py, ddim.py, then loader.py (how the checkpoint file maps onto the modules)."""
from .clip import CLIPConfig, TextEncoder
from .loader import CheckpointError, SDConfig, StableDiffusion, load_sd, read_header
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import LATENT_SCALE, VAE, VAEConfig
