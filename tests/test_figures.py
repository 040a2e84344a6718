"""tools/figures.py: the README's pictures are what the command draws today, and they show what they say."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tools import figures
from pictures import LABEL_HEIGHT
import sine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """figures.py run as the README runs it, into a fresh folder."""
    folder = tmp_path_factory.mktemp("figures")
    result = subprocess.run([sys.executable, "-m", "tools.figures", "--out", "pictures"],
                            cwd=folder, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return folder / "pictures", result.stdout.split()


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_the_committed_pictures_are_the_ones_figures_py_draws(drawn):
    folder, printed = drawn
    assert printed == ["pictures/position-map.png", "pictures/crops.jpg"]
    assert (pixels(folder / "position-map.png") == pixels(os.path.join(REPO, "docs", "position-map.png"))).all()
    # JPEG: the same pixels, up to the encoder of another Pillow build
    assert np.abs(pixels(folder / "crops.jpg") - pixels(os.path.join(REPO, "docs", "crops.jpg"))).mean() < 1.0
    assert os.path.getsize(os.path.join(REPO, "docs", "crops.jpg")) < 100_000


def test_the_top_row_varies_along_x_only_and_the_bottom_row_along_y_only(drawn):
    """What sine.position_map's docstring says of its two halves, seen in the picture."""
    picture = pixels(drawn[0] / "position-map.png")[..., 0]
    tile, band = figures.TILE, LABEL_HEIGHT  # each row of tiles has its labels in a band above it
    for col in range(5):
        x_tile = picture[band:band + tile, col * tile:(col + 1) * tile]
        y_tile = picture[2 * band + tile:, col * tile:(col + 1) * tile]
        assert x_tile.shape == y_tile.shape == (tile, tile)
        assert (x_tile == x_tile[-1]).all()              # constant down every column
        assert (y_tile == y_tile[:, :1]).all()           # constant along every row
        assert x_tile[-1].max() - x_tile[-1].min() > 200  # and it does vary
        assert (x_tile[-1] == y_tile[:, 0]).all()        # the same sinusoid, turned


def test_each_crop_is_cut_from_its_box_and_brings_the_map_of_its_box():
    image = Image.open(os.path.join(REPO, "examples", "cat.png")).convert("RGB")
    full_map = sine.position_map(figures.CHANNELS)
    picture, crop_boxes = figures.crops_picture(image, full_map, seed=3)
    assert len(crop_boxes) == 4 and len({tuple(b) for b in crop_boxes}) == 4
    tile = figures.TILE
    for col, (y0, x0, y1, x1) in enumerate(crop_boxes):
        bottom = picture.height  # the maps' row is the last, under its label band
        crop_map = np.asarray(picture.crop((col * tile, bottom - tile, (col + 1) * tile, bottom)), dtype=np.int16)
        whole_map = np.asarray(figures.as_colour(full_map).resize((sine.SD_V1.grid, sine.SD_V1.grid)), dtype=np.int16)
        # the crop's map at its bottom-right corner has the whole map's colour at the box's corner
        assert np.abs(crop_map[-1, -1, :2] - whole_map[y1 - 1, x1 - 1, :2]).max() <= 3


def test_a_photo_that_cannot_be_read_gets_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.figures", "missing.jpg", "--out", "pictures"],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "pictures").exists()
