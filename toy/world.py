"""The toy world: one shape on a plain background, and a caption that says only part of it.

    python -m toy.world scene.png --seed 3     # draws a scene; its caption goes to stderr

A caption names the shape and two colours: "a red circle on a white background". It cannot say
where the shape sits, how large it is, or how it is turned and stretched. Those are what SINE must
keep from the one picture it fine-tunes on; the colours are what a prompt edits.
"""
import argparse
import math
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64  # pixels a side: the toy base's native resolution

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 210, 40), "purple": (150, 60, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")

# Pairs the base never sees in training: sampling them shows it composes words it knows.
HELD_OUT = {("green", "triangle"), ("blue", "square"), ("yellow", "circle")}


@dataclass
class Scene:
    shape: str
    colour: str          # the shape's
    background: str
    cx: float            # centre, as a fraction of the width and height: text never says these
    cy: float
    radius: float        # as a fraction of the shorter side
    aspect: float        # the shape's width over its height
    angle: float         # degrees, for squares and triangles

    def caption(self):
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random, shape=None, colour=None, background=None, held_out=False):
    """A scene with the given words, the rest drawn from rng. Word pairs in HELD_OUT are drawn
    only when held_out is True (and then only they are)."""
    while True:
        scene = Scene(shape or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)),
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


def draw(scene, width=SIZE, height=SIZE, supersample=4):
    """The scene as an RGB image. Drawn 4x larger and scaled down, so that edges are smooth."""
    big = Image.new("RGB", (width * supersample, height * supersample), COLOURS[scene.background])
    points = [(x * supersample, y * supersample) for x, y in outline(scene, width, height)]
    ImageDraw.Draw(big).polygon(points, fill=COLOURS[scene.colour])
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
