"""Draw the README's two pictures of patch-based fine-tuning (Sec. 3.3) with sine.py's own functions.

    python -m tools.figures                             # examples/cat.png, into docs/
    python -m tools.figures castle.jpg --out pictures   # what fine-tuning will see of your photo

position-map.png: channels of SD v1's position map (320 channels on a 128 x 128 grid). Each is a
sinusoid along x (top row) or y (bottom row); the period shortens as the channel index falls.
crops.jpg: the photo on its square canvas with random crop boxes, drawn by the function that draws
train.py's; under it, each box's 512 x 512 crop as the UNet sees it, and the part of the position map that
comes with it. The map is shown as colour: red fades from left to right, green from top to bottom (two slow cosine
channels, one along x and one along y).
"""
import argparse
import os

import torch
from PIL import Image, ImageDraw

import cli
import sine
from pictures import grid_image, to_pil

CHANNELS = 320      # SD v1's first feature map, which the position map is added to
FREQUENCIES = CHANNELS // 4  # each axis has this many sines, then as many cosines
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231"]
TILE = 128


def gray(channel):
    """(R, C) in [-1, 1] -> a grey TILE x TILE image."""
    values = ((channel + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(values.numpy(), "L").resize((TILE, TILE), Image.NEAREST).convert("RGB")


def position_map_picture(full_map, indices=(0, 6, 12, 18, 24)):
    """Rows: channels along x, then along y; columns: sine i of each axis, period 2 pi 10000^(i/79) cells:
    6, 13, 25, 51 and 103 cells for the default indices."""
    cells = {}
    for row, (axis, offset) in enumerate([("x", 0), ("y", CHANNELS // 2)]):
        for col, i in enumerate(indices):
            cells[row, col] = (gray(full_map[offset + i]), f"{axis} sin {i}")
    return grid_image(cells, 2, len(indices))


def as_colour(position):
    """(C, h, w) part of the map -> RGB: red from x's slowest cosine, green from y's."""
    slow_cosine = FREQUENCIES + 32  # cos(p f) with f = 10000^(-32/79) = 0.024: from 1 to -1 across 128 cells
    red, green = position[slow_cosine], position[CHANNELS // 2 + slow_cosine]
    rgb = torch.stack([red, green, torch.full_like(red, -1.0)])[None]  # no blue
    return to_pil(rgb).resize((TILE, TILE), Image.BILINEAR)


def crops_picture(image, full_map, seed=0, count=4):
    """The canvas with `count` crop boxes from sine.sample_crop_box, then each crop and its map."""
    canvas = sine.make_canvas(image)
    generator = torch.Generator().manual_seed(seed)
    crop_boxes = [sine.sample_crop_box(generator) for _ in range(count)]

    top = Image.new("RGB", (count * TILE, 2 * TILE), "white")
    shown = canvas.resize((2 * TILE, 2 * TILE), Image.BICUBIC)
    draw = ImageDraw.Draw(shown)
    scale = 2 * TILE / sine.SD_V1.grid
    for crop_box, colour in zip(crop_boxes, COLOURS):
        y0, x0, y1, x1 = (c * scale for c in crop_box)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
    top.paste(shown, (0, 0))
    top.paste(as_colour(full_map).resize((2 * TILE, 2 * TILE)), (2 * TILE, 0))
    top = grid_image({(0, 0): (top, "the canvas, and the whole position map (red: x, green: y)")}, 1, 1)

    cells = {}
    for col, (crop_box, colour) in enumerate(zip(crop_boxes, COLOURS)):
        crop = to_pil(sine.crop_pixels(canvas, crop_box)).resize((TILE, TILE), Image.BICUBIC)
        ImageDraw.Draw(crop).rectangle([0, 0, TILE - 1, TILE - 1], outline=colour, width=3)
        cells[0, col] = (crop, f"crop {col + 1}")
        cells[1, col] = (as_colour(sine.crop_position_map(full_map, crop_box, (64, 64))[0]), "its map")
    below = grid_image(cells, 2, count)
    picture = Image.new("RGB", (count * TILE, top.height + below.height))
    picture.paste(top, (0, 0))
    picture.paste(below, (0, top.height))
    return picture, crop_boxes


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the position map and random crops of a photo.")
    p.add_argument("image", nargs="?", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                            "examples", "cat.png"))
    p.add_argument("--out", default="docs", help="folder for position-map.png and crops.jpg")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop boxes")
    args = p.parse_args(argv)
    try:
        cli.check_seed(args.seed)
        cli.check_writable_folder(os.path.join(args.out, "x.png"))
        image = cli.load_image(args.image)
    except (ValueError, OSError) as e:
        cli.fail(e)
    full_map = sine.position_map(CHANNELS)  # (320, 128, 128)
    os.makedirs(args.out, exist_ok=True)
    for name, picture in [("position-map.png", position_map_picture(full_map)),
                          ("crops.jpg", crops_picture(image, full_map, args.seed)[0])]:
        picture.save(os.path.join(args.out, name), optimize=True, quality=90)  # a photo: JPEG keeps it small
        print(os.path.join(args.out, name))


if __name__ == "__main__":
    main()
