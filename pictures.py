"""Pictures for the command lines: latents to images, labelled grids, and output sizes that keep a
photo's aspect. Used by edit.py, train.py's previews, the toy world and the figures."""
import torch
from PIL import Image, ImageDraw

from model import LATENT_SCALE

MAX_SIZE = 4096  # pixels a side; SD v1 was trained at 512, and far beyond this the VAE decoder fits no GPU


def size_step(config):
    """Sides must be multiples of this: the VAE's factor times the UNet's halvings, 8 x 8 = 64 for SD v1."""
    return config.vae.factor * 2 ** (len(config.unet.channel_mult) - 1)


def check_size(value, flag, step=64):
    if value is not None and (value < step or value > MAX_SIZE or value % step):
        clamp = lambda x: min(max(x, step), MAX_SIZE)
        nearest = sorted({clamp(value // step * step), clamp(-(-value // step) * step)})
        raise ValueError(f"--{flag} {value}: must be a multiple of {step} from {step} to {MAX_SIZE} "
                         f"(nearest: {' or '.join(map(str, nearest))})")


def default_size(source_size, height, width, native=512, step=64):
    """The source photo's aspect ratio, rounded to multiples of step: the base's native size (512
    for SD v1) on the short side, or the one side given."""
    w, h = source_size
    scale = height / h if height else width / w if width else native / min(w, h)
    rounded = lambda x: max(step, round(x * scale / step) * step)
    return height or rounded(h), width or rounded(w)


def to_pil(pixels):
    array = ((pixels[0].float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.numpy())


LABEL_HEIGHT = 16  # pixels of the band above each image that holds its label


def grid_image(cells, rows, cols, title=None):
    """cells: {(row, col): (image, label)} -> one image, each label in a band above its image, so
    that no label hides a pixel; a title (the target) in a band of its own above them all."""
    w, h = next(iter(cells.values()))[0].size
    cell_h, top = h + LABEL_HEIGHT, LABEL_HEIGHT if title else 0
    grid = Image.new("RGB", (cols * w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((2, 2), title, fill="black")
    for (r, c), (image, label) in cells.items():
        grid.paste(image, (c * w, top + r * cell_h + LABEL_HEIGHT))
        draw.text((c * w + 2, top + r * cell_h + 2), label, fill="black")
    return grid


@torch.no_grad()
def decode(sd, latent):
    """A latent (1, 4, h, w) -> the PIL image it decodes to."""
    return to_pil(sd.vae.decode(latent / LATENT_SCALE).clamp(-1, 1))
