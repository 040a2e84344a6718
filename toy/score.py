"""Reading a toy picture back, and the two scores of toy.replicate, each in [0, 1].

    fidelity(output, source)   how much of the source's layout is kept: the overlap (IoU) of where
                               the object is in each, 1 when it sits in the same place at the same size
    edit(output, source, reference)   how far the object's stripes have moved from the source's
                               towards those of the reference, the source drawn striped: 0 unchanged,
                               1 there

The object is whatever differs from the background, and the background is the colour of most of
the picture's border. Sizes may differ: the source's mask is stretched to the output's size first,
as SINE's position map stretches the photo's layout.

    python -m toy.score SOURCE EDIT   # EDIT: a PNG, or a folder, whose newest edit.py PNG is scored
"""
import argparse
import glob
import os

import numpy as np
from PIL import Image

from .world import COLOURS, SHAPES, STRIPE_PERIOD

THRESHOLD = 60.0  # RGB distance from the background beyond which a pixel is the object's


def as_array(image):
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def background_colour(pixels):
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])   # (N, 3)
    return np.median(border, axis=0)


def object_mask(image):
    """(H, W) bool: the pixels far from the background's colour."""
    pixels = as_array(image)
    return np.linalg.norm(pixels - background_colour(pixels), axis=-1) > THRESHOLD


def fidelity(output, source):
    """IoU of the object's masks, the source's stretched to the output's size. 0 if either has none."""
    stretched = source.convert("RGB").resize(output.size, Image.NEAREST)
    a, b = object_mask(output), object_mask(stretched)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def inside(mask):
    """The mask less its edge pixels, whose colours are blends with the background."""
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    return core


def stripe_strength(image):
    """How striped the object is: the amplitude of its colour's wave across x at the world's stripe
    period (the first Fourier coefficient over the object's inner pixels), over its mean colour.
    About 0.05 for a plain shape, 0.6 for a striped one; None if there is no object."""
    pixels, core = as_array(image), inside(object_mask(image))
    if core.sum() < 12:
        return None
    ys, xs = np.nonzero(core)
    values = pixels[core]                                                       # (N, 3)
    wave = np.exp(-2j * np.pi * xs / (STRIPE_PERIOD * min(image.size)))         # (N,)
    amplitude = 2 * np.abs(((values - values.mean(0)) * wave[:, None]).mean(0))  # (3,)
    return float(np.linalg.norm(amplitude) / np.linalg.norm(values.mean(0)))


def edit(output, source, reference):
    """(s - s_source) / (s_reference - s_source), clipped to [0, 1], where s is stripe_strength and the
    reference is the source drawn with the target's pattern. 0 when the output has no object."""
    now, before, goal = stripe_strength(output), stripe_strength(source), stripe_strength(reference)
    if now is None:
        return 0.0
    return float(np.clip((now - before) / (goal - before), 0, 1))


def nearest_colour(rgb):
    return min(COLOURS, key=lambda name: np.linalg.norm(np.asarray(rgb) - COLOURS[name]))


def shape_of(mask):
    """circle, square or triangle, from how far the mask's pixels spread from its centre once its
    spread is made round (so stretched and turned shapes read the same): mean(r^4) / mean(r^2)^2 is
    4/3 for a disc, 1.40 for a square and 1.60 for a triangle."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    points = np.stack([xs, ys], 1).astype(np.float64)
    points -= points.mean(0)
    values, vectors = np.linalg.eigh(np.cov(points.T))
    r2 = ((points @ vectors) ** 2 / np.maximum(values, 1e-9)).sum(1)
    peakedness = (r2 ** 2).mean() / r2.mean() ** 2
    return SHAPES[int(np.searchsorted([1.365, 1.49], peakedness))]


STRIPED = 0.3  # stripe_strength above which a shape reads as striped


def describe(image):
    """What a picture shows: (pattern, shape, colour, background), each None where it cannot be
    read. The colour is that of the object's brightest quarter, inside its edge: stripes leave it as it was."""
    pixels, mask = as_array(image), object_mask(image)
    strength = stripe_strength(image)
    pattern = None if strength is None else "striped" if strength > STRIPED else "plain"
    core, colour = inside(mask), None
    if core.any():
        brightness = pixels[core].sum(axis=1)
        colour = nearest_colour(pixels[core][brightness >= np.percentile(brightness, 75)].mean(axis=0))
    return pattern, shape_of(mask), colour, nearest_colour(background_colour(pixels))


def components(mask):
    """How many separate blobs the mask holds (4-connected), ignoring specks under 1% of the image."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        count += size >= 0.01 * mask.size
    return count


def newest_edit(folder):
    """The edit.py PNG with the highest counter in folder, its --strip pictures and grids left out."""
    pngs = [p for p in glob.glob(os.path.join(folder, "[0-9]*.png")) if not p.endswith(("-steps.png", "-grid.png"))]
    if not pngs:
        raise SystemExit(f"error: {folder} holds no PNG from edit.py")
    return max(pngs, key=lambda p: int(os.path.basename(p).split("-")[0]))


def main(argv=None):
    p = argparse.ArgumentParser(description="The fidelity of a toy edit to its source, and what the edit shows.")
    p.add_argument("source", help="the photo that was fine-tuned on")
    p.add_argument("edit", help="an edit's PNG, or the folder of edit.py's PNGs (the newest is scored)")
    args = p.parse_args(argv)
    path = args.edit if os.path.isfile(args.edit) else newest_edit(args.edit)
    with Image.open(args.source) as source, Image.open(path) as image:
        score, stripes, (_, shape, colour, background) = fidelity(image, source), stripe_strength(image), describe(image)
    stripes = "none" if stripes is None else f"{stripes:.2f}"
    print(f"fidelity {score:.2f}, stripes {stripes}: {colour} {shape} on {background} ({os.path.basename(path)})")


if __name__ == "__main__":
    main()
