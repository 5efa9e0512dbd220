"""The transfer study's toy properties: their renderers, their pixel detectors (failure cases included) and pairs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import toy_task


def grey_canvas(background=toy_task.BACKGROUND):
    return Image.new("RGB", (toy_task.SIZE, toy_task.SIZE), background)


def draw(image, boxes, colour=toy_task.COLOURS["red"]):
    for box in boxes:
        image.paste(colour, box)
    return toy_task.to_tensor([image])


def test_background_detector_reads_the_background_not_the_square():
    rng = np.random.default_rng(0)
    light = toy_task.to_tensor([toy_task.render_background("light", rng) for _ in range(16)])
    dark = toy_task.to_tensor([toy_task.render_background("dark", rng) for _ in range(16)])
    assert toy_task.has_light_background(light).all() and not toy_task.has_light_background(dark).any()
    # the largest square (16 x 16, a quarter of the image) in a light colour does not make a dark image light
    big_white = draw(grey_canvas(toy_task.SHADES["dark"]), [(0, 0, 16, 16)], colour=(255, 255, 255))
    assert not toy_task.has_light_background(big_white).item()
    # mid-grey (128) is darker than the threshold half-way between the shades (132)
    assert not toy_task.has_light_background(toy_task.to_tensor([grey_canvas()])).item()


def test_object_count_counts_separate_squares_and_ignores_specks():
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10)])).item() == 1
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10), (20, 20, 28, 28)])).item() == 2
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 8, 8), (20, 2, 26, 8), (2, 20, 8, 26)])).item() == 3
    # touching squares merge into one object; a diagonal touch is not a 4-connection
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10), (10, 2, 18, 10)])).item() == 1
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10), (10, 10, 18, 18)])).item() == 2
    # a missing object, a 3 x 3 speck (9 px < 12), a faint square (within the threshold of grey)
    assert toy_task.object_count(toy_task.to_tensor([grey_canvas()])).item() == 0
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10), (20, 20, 23, 23)])).item() == 1
    assert toy_task.object_count(draw(grey_canvas(), [(2, 2, 10, 10)], colour=(160, 110, 110))).item() == 0
    rng = np.random.default_rng(1)
    twos = toy_task.to_tensor([toy_task.render_count("two", rng) for _ in range(32)])
    ones = toy_task.to_tensor([toy_task.render_count("one", rng) for _ in range(32)])
    assert toy_task.object_count(twos).tolist() == [2] * 32 and toy_task.object_count(ones).tolist() == [1] * 32


def test_position_detector_reads_the_centre_of_mass():
    assert toy_task.on_the_left(draw(grey_canvas(), [(0, 5, 10, 15)])).item()
    assert not toy_task.on_the_left(draw(grey_canvas(), [(20, 5, 30, 15)])).item()
    # straddling the middle: the side with more of the square; an empty image is not on the left
    assert toy_task.on_the_left(draw(grey_canvas(), [(8, 5, 20, 15)])).item()
    assert not toy_task.on_the_left(draw(grey_canvas(), [(13, 5, 25, 15)])).item()
    assert not toy_task.on_the_left(toy_task.to_tensor([grey_canvas()])).item()
    rng = np.random.default_rng(2)
    left = toy_task.to_tensor([toy_task.render_position("left", rng) for _ in range(32)])
    right = toy_task.to_tensor([toy_task.render_position("right", rng) for _ in range(32)])
    assert toy_task.on_the_left(left).all() and not toy_task.on_the_left(right).any()


def test_size_detector_reads_the_foreground_area():
    assert toy_task.is_big(draw(grey_canvas(), [(2, 2, 17, 17)])).item()  # 15 x 15 = 225 px
    assert not toy_task.is_big(draw(grey_canvas(), [(2, 2, 11, 11)])).item()  # 9 x 9 = 81 px
    # the threshold, 135 px: 12 x 12 = 144 is big, 11 x 12 = 132 is not; an empty image is small
    assert toy_task.is_big(draw(grey_canvas(), [(2, 2, 14, 14)])).item()
    assert not toy_task.is_big(draw(grey_canvas(), [(2, 2, 13, 14)])).item()
    assert not toy_task.is_big(toy_task.to_tensor([grey_canvas()])).item()


def test_orientation_detector_compares_the_spread_across_and_down():
    assert toy_task.is_wide(draw(grey_canvas(), [(2, 10, 20, 16)])).item()  # 18 x 6
    assert not toy_task.is_wide(draw(grey_canvas(), [(10, 2, 16, 20)])).item()  # 6 x 18
    # two squares side by side read as wide, one above the other as tall; a lone square or nothing is not wide
    assert toy_task.is_wide(draw(grey_canvas(), [(2, 2, 8, 8), (20, 2, 26, 8)])).item()
    assert not toy_task.is_wide(draw(grey_canvas(), [(2, 2, 8, 8), (2, 20, 8, 26)])).item()
    assert not toy_task.is_wide(draw(grey_canvas(), [(2, 2, 10, 10)])).item()
    assert not toy_task.is_wide(toy_task.to_tensor([grey_canvas()])).item()


@pytest.mark.parametrize("prop", ["background", "count", "position", "size", "orientation"])
def test_each_property_trains_on_both_values_equally_and_its_pairs_rank_the_preferred_first(tmp_path, prop):
    detect = toy_task.PROPERTIES[prop]["detect"]
    images = toy_task.training_images(64, seed=3, task=prop)
    assert images.shape == (64, 3, 32, 32) and int(detect(images).sum()) == 32
    manifest = toy_task.build_pairs(tmp_path / "pairs", count=6, task=prop)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    swapped = [json.loads(line) for line in (manifest.parent / "pairs_swapped.jsonl").read_text().splitlines()]

    def preferred(name):
        return detect(toy_task.to_tensor([Image.open(manifest.parent / name).convert("RGB")])).item()

    for row, other in zip(rows, swapped):
        assert preferred(row["chosen"]) and not preferred(row["rejected"])
        assert (other["chosen"], other["rejected"]) == (row["rejected"], row["chosen"])
    captions = toy_task.task_captions(prop, 4)
    assert toy_task.prefers(torch.cat([images[:4]]), captions, prop).tolist() == detect(images[:4]).tolist()


def test_the_colour_toys_images_and_settings_are_unchanged_by_the_new_properties(tmp_path, monkeypatch):
    """The colour task's folders built before the properties existed are reused: same images, same settings."""
    rng = np.random.default_rng(0)
    colours = rng.permutation(["red", "blue"] * 4)
    expected = toy_task.to_tensor([toy_task.render(colour, rng) for colour in colours])
    assert torch.equal(toy_task.training_images(8, 0), expected)
    seen = {}
    monkeypatch.setattr(toy_task, "_atomic_folder", lambda folder, build, settings=None: seen.update(
        {Path(folder).name: settings}) or folder)
    toy_task.build_task_model(tmp_path, "colour", vae_steps=1, unet_steps=1)
    toy_task.build_task_model(tmp_path, "count", vae_steps=1, unet_steps=1)
    assert seen["model"] == {"seed": 0, "vae_steps": 1, "unet_steps": 1, "kind": "sdxl", "lean": False}
    assert seen["model_count"] == {**seen["model"], "property": "count"}
