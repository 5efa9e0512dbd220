"""trajectory_cache.py: hits reproduce the inversion, keys follow everything a trajectory depends on, damage heals."""

import copy
import logging

import pytest
import torch

from inversion import InversionSchedule, PromptEncoder, invert
from trajectory_cache import TrajectoryCache, weights_fingerprint

SETTINGS = {"num_steps": 4, "guidance": 2.0}


@pytest.fixture(scope="module")
def setup(sdxl_pipe):
    torch.manual_seed(0)
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    cond = encoder.encode(["red", "blue", "green"], [[64, 64]] * 3, [[0, 0]] * 3, (64, 64))
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 4)
    latents = torch.randn(3, 4, 8, 8)

    def invert_rows(rows):
        invert_rows.calls.append(list(range(3))[rows] if isinstance(rows, slice) else rows)
        return invert(sdxl_pipe.unet, latents[rows], cond.select(rows), encoder.unconditional(cond).select(rows),
                      schedule, 2.0, with_noise_at_end=True)

    invert_rows.calls = []
    return dict(cond=cond, schedule=schedule, latents=latents, invert=invert_rows,
                fingerprint=weights_fingerprint(sdxl_pipe.unet, torch.float32))


def test_float32_entries_reproduce_the_inversion_bit_for_bit_and_are_reused(setup, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    direct = setup["invert"](slice(None))
    setup["invert"].calls.clear()
    for expected_calls in ([[0, 1, 2]], [[0, 1, 2]]):  # the first call inverts, the second reads
        trajectory = cache.trajectories(setup["latents"], setup["cond"], setup["schedule"], True, setup["invert"])
        assert setup["invert"].calls == expected_calls
        for name in ("latents", "noise", "noise_at_end"):
            assert torch.equal(getattr(trajectory, name), getattr(direct, name)), name
    assert cache.summary() == {"cache_hits": 3, "cache_misses": 3, "cache_repaired": 0}
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3 and not list(tmp_path.rglob("*.incomplete"))


def test_bfloat16_entries_round_the_noise_and_rebuild_a_consistent_path(setup, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "bfloat16")
    direct = setup["invert"](slice(None))
    trajectory = cache.trajectories(setup["latents"], setup["cond"], setup["schedule"], True, setup["invert"])
    assert torch.equal(trajectory.noise, direct.noise.to(torch.bfloat16).float())
    assert torch.equal(trajectory.latents[:, 0], direct.latents[:, 0])
    # every x_i is the DDIM step from x_{i-1} along the stored noise, written out here
    a = setup["schedule"].alphas
    for i in range(4):
        x_prev, e = trajectory.latents[:, i], trajectory.noise[:, i]
        x_next = a[i + 1].sqrt() * (x_prev - (1 - a[i]).sqrt() * e) / a[i].sqrt() + (1 - a[i + 1]).sqrt() * e
        torch.testing.assert_close(trajectory.latents[:, i + 1], x_next, rtol=1e-5, atol=1e-5)
    assert (trajectory.latents - direct.latents).abs().max() < 0.05


def test_keys_follow_the_image_the_caption_the_reference_and_the_settings(setup, sdxl_pipe, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS)
    latents, cond = setup["latents"], setup["cond"]
    key = cache.key(latents, cond, 0)
    assert key == TrajectoryCache(tmp_path, setup["fingerprint"], dict(SETTINGS)).key(latents.clone(), cond, 0)
    assert cache.key(latents, cond, 1) != key  # another image and caption
    shifted = latents.clone()
    shifted[0, 0, 0, 0] += 1e-3
    assert cache.key(shifted, cond, 0) != key
    other_caption = copy.deepcopy(cond)
    other_caption.prompt_embeds[0] = cond.prompt_embeds[1]
    assert cache.key(latents, other_caption, 0) != key
    assert TrajectoryCache(tmp_path, setup["fingerprint"], {**SETTINGS, "guidance": 1.0}).key(latents, cond, 0) != key
    changed = copy.deepcopy(sdxl_pipe.unet)
    with torch.no_grad():
        next(changed.parameters())[0].add_(1e-6)  # same name, other weights
    assert weights_fingerprint(changed, torch.float32) != setup["fingerprint"]
    assert weights_fingerprint(sdxl_pipe.unet, torch.bfloat16) != setup["fingerprint"]  # what the reference computes in


def test_a_damaged_entry_is_logged_recomputed_and_rewritten(setup, tmp_path, caplog):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    first = cache.trajectories(setup["latents"], setup["cond"], setup["schedule"], True, setup["invert"])
    damaged = cache.path(cache.key(setup["latents"], setup["cond"], 1))
    damaged.write_bytes(damaged.read_bytes()[:100])  # a write cut short
    setup["invert"].calls.clear()
    with caplog.at_level(logging.WARNING):
        again = cache.trajectories(setup["latents"], setup["cond"], setup["schedule"], True, setup["invert"])
    assert "damaged trajectory cache entry" in caplog.text and str(damaged) in caplog.text
    assert setup["invert"].calls == [[1]] and cache.repaired == 1
    # recomputed alone rather than in a batch of 3, so compared with image 1 inverted alone (a UNet call on a batch
    # rounds differently from one on a single image, by an amount that depends on the CPU's kernels)
    alone = setup["invert"]([1])
    for name in ("latents", "noise", "noise_at_end"):
        assert torch.equal(getattr(again, name)[1], getattr(alone, name)[0]), name
        assert torch.equal(getattr(again, name)[[0, 2]], getattr(first, name)[[0, 2]]), name  # read, not recomputed
    assert cache.load(cache.key(setup["latents"], setup["cond"], 1), 4, True) is not None  # healed on disk


def test_unknown_cache_dtype_is_named():
    with pytest.raises(ValueError, match="unknown cache dtype 'float16'; choose one of float32, bfloat16"):
        TrajectoryCache("unused", "x", SETTINGS, "float16")
