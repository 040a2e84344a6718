"""The toy world: one shape on a plain background, and a caption that says only part of it.

    python -m toy.world scene.png --seed 3     # draws a scene; its caption goes to stderr

A caption names the shape's pattern, its colour, the shape and the background's colour: "a plain
red circle on a white background", "a striped green square on a blue background". It cannot say
where the shape sits, how large it is, or how it is turned and stretched. Those are what SINE must
keep from the one picture it fine-tunes on; the pattern is what toy.replicate's prompt edits.

Why stripes, rather than a colour, for the edit: a diffusion model settles a picture's coarse
layout and colours at high noise and its fine detail at low noise. SINE's K leans on that, handing
the low-noise steps to the pre-trained model so that it adds detail to a layout already fixed.
Stripes a few pixels apart are such detail; a colour is settled with the layout.
"""
import argparse
import math
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

SIZE = 64  # pixels a side: the toy base's native resolution

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("plain", "striped")
STRIPE_PERIOD = 1 / 8  # of the shorter side: 8 pixels at 64 (2 latent pixels), 2 to 4 stripes a shape
STRIPE_SHADE = 0.45    # a stripe is the shape's colour this much as bright

# Pairs the base never sees in training: sampling them shows it composes words it knows.
HELD_OUT = {("green", "triangle"), ("blue", "square"), ("yellow", "circle")}


@dataclass
class Scene:
    pattern: str
    shape: str
    colour: str          # the shape's
    background: str
    cx: float            # centre, as a fraction of the width and height: text never says these
    cy: float
    radius: float        # as a fraction of the shorter side
    aspect: float        # the shape's width over its height
    angle: float         # degrees, for squares and triangles

    def caption(self):
        return f"a {self.pattern} {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, pattern=None, shape=None, colour=None, background=None, held_out=False):
    """A scene with the given words, the rest drawn from rng. Word pairs in HELD_OUT are drawn
    only when held_out is True (and then only they are)."""
    while True:
        scene = Scene(pattern or rng.choice(PATTERNS), shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)),
                      background or rng.choice(list(COLOURS)), cx=rng.uniform(0.25, 0.75),
                      cy=rng.uniform(0.25, 0.75), radius=rng.uniform(0.15, 0.28), aspect=rng.uniform(0.7, 1.4),
                      angle=rng.uniform(0, 90))
        if scene.colour != scene.background and ((scene.colour, scene.shape) in HELD_OUT) == held_out:
            return scene


def outline(scene, width, height):
    """The shape's polygon in pixels (a circle is a 48-gon)."""
    r = scene.radius * min(width, height)
    corners = {"circle": 48, "square": 4, "triangle": 3}[scene.shape]
    turn = 0.0 if scene.shape == "circle" else math.radians(scene.angle)
    rx, ry = r * math.sqrt(scene.aspect), r / math.sqrt(scene.aspect)
    points = []
    for i in range(corners):
        a = turn + 2 * math.pi * i / corners + (math.pi / 4 if scene.shape == "square" else 0)
        points.append((scene.cx * width + rx * math.cos(a), scene.cy * height + ry * math.sin(a)))
    return points


def stripe_colour(colour):
    return tuple(round(STRIPE_SHADE * c) for c in COLOURS[colour])


def stripes(scene, width, height):
    """(x0, x1) pixel spans of the dark stripes: vertical, half of each period, one centred on the
    shape so that they move with it."""
    period = STRIPE_PERIOD * min(width, height)
    centre = scene.cx * width
    first = -math.ceil(centre / period) - 1
    return [(centre + (k - 0.25) * period, centre + (k + 0.25) * period)
            for k in range(first, first + math.ceil(width / period) + 3)]


def draw(scene, width=SIZE, height=SIZE, supersample=4):
    """The scene as an RGB image. Drawn 4x larger and scaled down, so that edges are smooth."""
    size = (width * supersample, height * supersample)
    big = Image.new("RGB", size, COLOURS[scene.background])
    points = [(x * supersample, y * supersample) for x, y in outline(scene, width, height)]
    ImageDraw.Draw(big).polygon(points, fill=COLOURS[scene.colour])
    if scene.pattern == "striped":
        dark, shape = Image.new("RGB", size, stripe_colour(scene.colour)), Image.new("L", size, 0)
        ImageDraw.Draw(shape).polygon(points, fill=255)
        bands = Image.new("L", size, 0)
        for x0, x1 in stripes(scene, width, height):
            ImageDraw.Draw(bands).rectangle([x0 * supersample, 0, x1 * supersample - 1, size[1]], fill=255)
        big.paste(dark, mask=ImageChops.darker(bands, shape))  # stripes, inside the shape only
    return big.resize((width, height), Image.BOX)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw one toy scene and print its caption.")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=SIZE)
    p.add_argument("--height", type=int, default=SIZE)
    args = p.parse_args(argv)
    scene = random_scene(random.Random(args.seed))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw(scene, args.width, args.height).save(args.out)
    print(f"caption: {scene.caption()}", file=sys.stderr)
    print(args.out)  # like train.py and edit.py: stdout holds only the paths written


if __name__ == "__main__":
    main()
