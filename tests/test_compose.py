"""The compositional toy (compose_toy.py): captions, scenes, the detector that reads a scene from pixels, the pairs,
and the whole-word tokenizers of its base models."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

import compose_toy as ct
from toy_task import to_tensor


def test_captions_and_scenes_correspond_one_to_one():
    scenes = ct.all_scenes()
    assert len(scenes) == len(set(scenes)) == 2 * 12 * 4  # relations x ordered distinct colours x sizes
    assert all(ct.Scene.from_caption(scene.caption) == scene for scene in scenes)
    assert ct.Scene(("big", "red"), ("small", "blue"), "left of").caption == \
        "a big red square left of a small blue square"
    assert ct.Scene(("small", "green"), ("small", "yellow"), "above").caption == \
        "a small green square above a small yellow square"
    for bad in ("a big red square", "a big red square right of a small blue square",
                "a big pink square above a small blue square", "the big red square above a small blue square",
                "a big red circle above a small blue square", "a huge red square above a small blue square"):
        with pytest.raises(ValueError, match="not a caption"):
            ct.Scene.from_caption(bad)


def test_held_out_captions_are_new_combinations_of_known_words():
    trained, heldout = ct.split_captions()
    assert len(heldout) == 24 and len(trained) == 72 and not set(trained) & set(heldout)
    assert {word for scene in trained for word in scene.caption.split()} == set(ct.WORDS)
    assert ct.split_captions() == (trained, heldout)  # reproducible


def test_the_detector_reads_every_rendered_scene_as_drawn():
    rng = np.random.default_rng(0)
    scenes = ct.all_scenes()
    images = to_tensor([ct.render(scene, rng) for scene in scenes])
    assert ct.read_scenes(images) == scenes
    assert ct.follows(images, [scene.caption for scene in scenes]).all()
    # and as not drawn: each compositional error follows its own caption, not the original one
    for kind in ct.LOSER_KINDS:
        originals = [scene for scene in scenes if kind != "swap colours" or scene.first[0] != scene.second[0]]
        wrong = [ct.corrupt(scene, kind, rng) for scene in originals]
        drawn = to_tensor([ct.render(scene, rng) for scene in wrong])
        assert not ct.follows(drawn, [scene.caption for scene in originals]).any()
        assert ct.follows(drawn, [scene.caption for scene in wrong]).all()


def scene_image(squares):
    """A 32x32 grey image with (rgb, left, top, side) squares drawn."""
    image = Image.new("RGB", (ct.SIZE, ct.SIZE), ct.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for rgb, left, top, side in squares:
        ct.draw_square(draw, rgb, left, top, side)
    return image


def test_the_detector_fails_a_missing_a_merged_an_extra_or_an_unknown_coloured_object():
    red, blue, green, magenta = ct.COLOURS["red"], ct.COLOURS["blue"], ct.COLOURS["green"], (200, 40, 200)
    cases = {
        "both": [(red, 2, 10, 12), (blue, 19, 12, 8)],
        "one missing": [(red, 2, 10, 12)],
        "merged": [(red, 6, 10, 12), (blue, 18, 10, 12)],  # touching: one component
        "extra": [(red, 1, 2, 8), (blue, 20, 2, 8), (green, 12, 20, 8)],
        "unknown colour": [(magenta, 2, 10, 12), (blue, 19, 10, 12)],
        "a speck beside one": [(red, 2, 10, 12), (blue, 20, 10, 3)],  # 9 px: below MIN_PIXELS
        "above": [(green, 10, 2, 7), (red, 12, 18, 13)],
    }
    read = ct.read_scenes(to_tensor([scene_image(squares) for squares in cases.values()]))
    assert dict(zip(cases, read)) == {
        "both": ct.Scene(("big", "red"), ("small", "blue"), "left of"), "one missing": None, "merged": None,
        "extra": None, "unknown colour": None, "a speck beside one": None,
        "above": ct.Scene(("small", "green"), ("big", "red"), "above")}


def test_sizes_are_told_apart_by_pixel_count_at_every_side_drawn():
    for small in range(*ct.SIZES["small"]):
        for big in range(*ct.SIZES["big"]):
            image = to_tensor([scene_image([(ct.COLOURS["red"], 1, 8, small), (ct.COLOURS["blue"], 17, 8, big)])])
            assert ct.read_scenes(image) == [ct.Scene(("small", "red"), ("big", "blue"), "left of")]
    assert (ct.SIZES["small"][1] - 1) ** 2 < ct.BIG_PIXELS < ct.SIZES["big"][0] ** 2


def test_each_corruption_changes_exactly_what_it_names():
    rng = np.random.default_rng(0)
    scene = ct.Scene(("big", "red"), ("small", "blue"), "above")
    assert ct.corrupt(scene, "swap colours", rng) == ct.Scene(("big", "blue"), ("small", "red"), "above")
    assert ct.corrupt(scene, "swap positions", rng) == ct.Scene(("small", "blue"), ("big", "red"), "above")
    for _ in range(10):
        replaced = ct.corrupt(scene, "replace object", rng)
        assert replaced.relation == "above" and [size for size, _ in replaced.objects] == ["big", "small"]
        changed = [new for new, old in zip(replaced.objects, scene.objects) if new != old]
        assert len(changed) == 1 and changed[0][1] in ("green", "yellow")
    same_sizes = ct.Scene(("big", "red"), ("big", "blue"), "left of")
    assert all(ct.loser_kind(same_sizes, rng) != "swap colours" for _ in range(20))
    with pytest.raises(ValueError, match="unknown corruption"):
        ct.corrupt(scene, "mirror", rng)


def test_pairs_hold_a_coherent_winner_and_a_loser_with_one_error_and_their_swap(tmp_path):
    pairs = ct.build_pairs(tmp_path / "pairs", count=12)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    swapped = [json.loads(line) for line in (pairs.parent / "pairs_swapped.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and [r["caption"] for r in rows] == [s.caption for s in ct.split_captions()[0][:12]]
    assert swapped == [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    captions = [row["caption"] for row in rows]
    winners = to_tensor([Image.open(pairs.parent / row["chosen"]).convert("RGB") for row in rows])
    losers = to_tensor([Image.open(pairs.parent / row["rejected"]).convert("RGB") for row in rows])
    assert ct.follows(winners, captions).all() and not ct.follows(losers, captions).any()


def test_the_toy_tokenizers_read_each_word_as_one_token_and_the_default_ones_are_unchanged():
    from tiny_models import MAX_TOKENS, _t5_tokenizer, _tokenizer

    clip, t5 = _tokenizer("!", ct.WORDS), _t5_tokenizer(ct.WORDS)
    for word in ct.WORDS:
        assert clip.tokenize(word) == [word + "</w>"] and t5.tokenize(word) == ["▁" + word]
    longest = max(ct.all_scenes(), key=lambda scene: len(scene.caption.split()))
    assert len(clip(longest.caption).input_ids) == len(longest.caption.split()) + 2 <= MAX_TOKENS
    # without words: letters, as every other toy and test model has them, with the same ids
    plain = _tokenizer("!")
    assert plain.tokenize("red") == ["r", "e", "d</w>"]
    assert plain.get_vocab().items() <= clip.get_vocab().items()


@pytest.mark.slow
def test_the_compose_base_model_builds_and_the_cli_evaluates_a_run(tmp_path, capsys):
    # the whole path at a few training steps (the real build's accuracy is in docs/compositional.md)
    import shutil
    from argparse import Namespace

    import toy_task

    model = ct.build_model(tmp_path / "model_compose", vae_steps=2, unet_steps=2, count=64)
    assert json.loads((model / toy_task.COMPLETE).read_text())["unet_steps"] == 2
    pipe = toy_task.load_pipeline(model)
    assert pipe.tokenizer.tokenize("a big red square") == ["a</w>", "big</w>", "red</w>", "square</w>"]
    run = tmp_path / "run"
    shutil.copytree(model / "unet", run / "unet")  # a "trained" run that changed nothing
    toy_task.run(Namespace(command="evaluate", out_dir=str(tmp_path), run_dir=str(run), task="compose",
                           kind="sdxl", samples=24, seed=0))
    results = json.loads((run / "compositional_accuracy.json").read_text())
    assert results["base"] == results["tuned"]  # the same weights sample the same images
    assert set(results["base"]) == {"heldout", "trained"} and all(0 <= v <= 1 for v in results["base"].values())
    assert "compositional accuracy" in capsys.readouterr().out
