"""trajectory_cache.py: hits reproduce what a miss computes, keys follow everything an entry depends on, the
reference's stored errors are exactly what its predictions give, damage heals, processes can share a folder."""

import copy
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from inversion import InversionSchedule, Trajectory, invert, predict_on_trajectory
from models import PromptEncoder
from losses import squared_error
from trajectory_cache import REFERENCE_TARGETS, TrajectoryCache, weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"num_steps": 4, "guidance": 2.0}
CAPTIONS = ["red", "blue", "green"]


@pytest.fixture(scope="module")
def setup(sdxl_pipe):
    torch.manual_seed(0)
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2], [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2])
    cond = encoder.encode(CAPTIONS, [[64, 64]] * 3, [[0, 0]] * 3, (64, 64))
    uncond = encoder.unconditional(cond)
    schedule = InversionSchedule.from_scheduler_config(sdxl_pipe.scheduler.config, 4)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    latents = sdxl_pipe.vae.encode(pixels).latent_dist.mode() * sdxl_pipe.vae.config.scaling_factor

    def encode(rows):
        encode.calls.append(rows)
        return latents[rows], cond.select(rows)

    def invert_rows(rows):
        invert_rows.calls.append(rows)
        return invert(sdxl_pipe.unet, latents[rows], cond.select(rows), uncond.select(rows), schedule, 2.0)

    def reference_errors(trajectory, rows):  # the trainer's reference_errors, written out: every step in one call
        prediction = predict_on_trajectory(sdxl_pipe.unet, trajectory, cond.select(rows), uncond.select(rows), 2.0,
                                           at="end")
        return {"step": squared_error(prediction, trajectory.noise, 2),
                "anchored": squared_error(prediction, trajectory.anchored_target(), 2)}

    encode.calls, invert_rows.calls = [], []
    return dict(unet=sdxl_pipe.unet, cond=cond, uncond=uncond, schedule=schedule, latents=latents, pixels=pixels, encode=encode,
                invert=invert_rows, reference_errors=reference_errors,
                fingerprint=weights_fingerprint(sdxl_pipe.unet, torch.float32))


def keys_of(cache, setup):
    return [cache.image_key(setup["pixels"][b], CAPTIONS[b], [[64, 64], [0, 0], 64]) for b in range(3)]


def read(cache, setup):
    keys = keys_of(cache, setup)
    latents, cond = cache.encodings(keys, setup["encode"], "unet", "cpu")
    trajectory = cache.trajectories(keys, latents, setup["schedule"], setup["invert"], setup["reference_errors"])
    return latents, cond, trajectory


def test_float32_entries_reproduce_the_uncached_step_bit_for_bit_and_are_reused(setup, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    direct = setup["invert"](slice(None))
    direct_errors = setup["reference_errors"](direct, slice(None))
    setup["invert"].calls.clear()
    setup["encode"].calls.clear()
    for expected_calls in ([[0, 1, 2]], [[0, 1, 2]]):  # the first read computes, the second reads
        latents, cond, trajectory = read(cache, setup)
        assert setup["invert"].calls == expected_calls and setup["encode"].calls == expected_calls
        assert torch.equal(latents, setup["latents"])
        for mine, theirs in zip(cond._fields(), setup["cond"]._fields()):
            assert torch.equal(mine, theirs)
        for name in ("latents", "noise"):
            assert torch.equal(getattr(trajectory, name), getattr(direct, name)), name
        for target in REFERENCE_TARGETS:
            assert torch.equal(trajectory.reference_errors[target], direct_errors[target]), target
    assert cache.summary() == {"cache_hits": 3, "cache_misses": 3, "cache_repaired": 0, "encoding_cache_hits": 3,
                               "encoding_cache_misses": 3}
    assert len(list(tmp_path.rglob("*.safetensors"))) == 6 and not list(tmp_path.rglob("*.incomplete"))


def test_stored_reference_errors_are_exactly_the_errors_of_its_predictions(setup, tmp_path):
    """The cache keeps 2N numbers of the reference per image instead of its N predictions at x_i: the exact and
    anchored losses use a prediction only through mean_elements (eps_ref(x_i) - target_i)^2, so storing those errors
    is exact. Here: the stored errors equal the errors of the reference's predictions (`invert`'s noise_at_end, the
    same call pattern) bit for bit, and the targets written out (e_i; eps^_i = (x_i - sqrt(a_i) x_0) / sqrt(1 - a_i))
    to float32 rounding; so the loss from either is the same number."""
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    read(cache, setup)
    _, _, stored = read(cache, setup)  # from disk
    full = invert(setup["unet"], setup["latents"], setup["cond"], setup["uncond"], setup["schedule"], 2.0,
                  with_noise_at_end=True)
    anchored = full.anchored_target()
    assert torch.equal(stored.reference_errors["step"], squared_error(full.noise_at_end, full.noise, 2))
    assert torch.equal(stored.reference_errors["anchored"], squared_error(full.noise_at_end, anchored, 2))
    a = setup["schedule"].alphas
    for b in range(3):
        for i in range(4):
            x0, x_i, e_i = full.latents[b, 0], full.latents[b, i + 1], full.noise[b, i]
            target = (x_i - a[i + 1].sqrt() * x0) / (1 - a[i + 1]).sqrt()
            prediction = full.noise_at_end[b, i]
            torch.testing.assert_close(stored.reference_errors["step"][b, i], ((prediction - e_i) ** 2).mean(),
                                       rtol=1e-5, atol=0)
            torch.testing.assert_close(stored.reference_errors["anchored"][b, i], ((prediction - target) ** 2).mean(),
                                       rtol=1e-5, atol=0)


def test_bfloat16_entries_round_the_noise_and_rebuild_a_consistent_path(setup, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "bfloat16")
    direct = setup["invert"](slice(None))
    _, _, trajectory = read(cache, setup)
    assert torch.equal(trajectory.noise, direct.noise.to(torch.bfloat16).float())
    assert torch.equal(trajectory.latents[:, 0], direct.latents[:, 0])
    # every x_i is the DDIM step from x_{i-1} along the stored noise, written out here
    a = setup["schedule"].alphas
    for i in range(4):
        x_prev, e = trajectory.latents[:, i], trajectory.noise[:, i]
        x_next = a[i + 1].sqrt() * (x_prev - (1 - a[i]).sqrt() * e) / a[i].sqrt() + (1 - a[i + 1]).sqrt() * e
        torch.testing.assert_close(trajectory.latents[:, i + 1], x_next, rtol=1e-5, atol=1e-5)
    assert (trajectory.latents - direct.latents).abs().max() < 0.05
    # the reference's errors were taken at the rebuilt points, the ones the policy sees: a hit gives the same
    rebuilt = Trajectory.from_noise(setup["latents"], trajectory.noise, setup["schedule"])
    expected = setup["reference_errors"](rebuilt, slice(None))
    _, _, again = read(cache, setup)
    for target in REFERENCE_TARGETS:
        assert torch.equal(trajectory.reference_errors[target], expected[target])
        assert torch.equal(again.reference_errors[target], expected[target])


def test_keys_follow_the_pixels_the_caption_the_ids_the_encoders_the_reference_and_the_settings(setup, sdxl_pipe,
                                                                                               tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, encoders={"vae": "v"})
    pixels = setup["pixels"][0]
    key = cache.image_key(pixels, "red", [[64, 64], [0, 0], 64])
    same = TrajectoryCache(tmp_path, setup["fingerprint"], dict(SETTINGS), encoders={"vae": "v"})
    assert key == same.image_key(pixels.clone(), "red", [[64, 64], [0, 0], 64])
    flipped, shifted = pixels.flip(-1), pixels.clone()
    shifted[0, 0, 0] += 1e-3
    others = [cache.image_key(flipped, "red", [[64, 64], [0, 0], 64]),
              cache.image_key(shifted, "red", [[64, 64], [0, 0], 64]),
              cache.image_key(pixels, "blue", [[64, 64], [0, 0], 64]),
              cache.image_key(pixels, "red", [[64, 80], [0, 0], 64]),  # SDXL's original size
              cache.image_key(pixels, "red", [[64, 64], [0, 8], 64]),  # and crop
              TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, encoders={"vae": "w"})
              .image_key(pixels, "red", [[64, 64], [0, 0], 64])]
    assert len(set(others + [key])) == len(others) + 1
    trajectory_key = cache.trajectory_key(key)
    assert trajectory_key == same.trajectory_key(key) and cache.trajectory_key(others[0]) != trajectory_key
    assert TrajectoryCache(tmp_path, setup["fingerprint"], {**SETTINGS, "guidance": 1.0}).trajectory_key(key) \
        != trajectory_key
    assert TrajectoryCache(tmp_path, "other", SETTINGS).trajectory_key(key) != trajectory_key
    assert TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32").trajectory_key(key) != trajectory_key
    changed = copy.deepcopy(sdxl_pipe.unet)
    with torch.no_grad():
        next(changed.parameters())[0].add_(1e-6)  # same name, other weights
    assert weights_fingerprint(changed, torch.float32) != setup["fingerprint"]
    assert weights_fingerprint(sdxl_pipe.unet, torch.bfloat16) != setup["fingerprint"]  # what the reference computes in


def test_a_damaged_entry_is_logged_recomputed_and_rewritten(setup, tmp_path, caplog):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    _, _, first = read(cache, setup)
    damaged = cache.path(cache.trajectory_key(keys_of(cache, setup)[1]))
    damaged.write_bytes(damaged.read_bytes()[:100])  # a write cut short
    setup["invert"].calls.clear()
    with caplog.at_level(logging.WARNING):
        _, _, again = read(cache, setup)
    assert "damaged trajectory cache entry" in caplog.text and str(damaged) in caplog.text
    assert setup["invert"].calls == [[1]] and cache.repaired == 1
    # recomputed alone rather than in a batch of 3, so compared with image 1 inverted alone (a UNet call on a batch
    # rounds differently from one on a single image, by an amount that depends on the CPU's kernels)
    alone = setup["invert"]([1])
    assert torch.equal(again.noise[1], alone.noise[0])
    assert torch.equal(again.noise[[0, 2]], first.noise[[0, 2]])  # read, not recomputed
    setup["invert"].calls.clear()
    read(cache, setup)
    assert setup["invert"].calls == []  # healed on disk


def test_an_entry_without_the_reference_errors_is_completed_when_a_form_needs_them(setup, tmp_path):
    cache = TrajectoryCache(tmp_path, setup["fingerprint"], SETTINGS, "float32")
    keys = keys_of(cache, setup)
    latents, _ = cache.encodings(keys, setup["encode"], "unet", "cpu")
    plain = cache.trajectories(keys, latents, setup["schedule"], setup["invert"])  # the paper form's entry
    assert plain.reference_errors is None
    setup["invert"].calls.clear()
    _, _, full = read(cache, setup)
    assert setup["invert"].calls == [[0, 1, 2]] and torch.equal(full.noise, plain.noise)


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from trajectory_cache import TrajectoryCache
from inversion import InversionSchedule, Trajectory
cache = TrajectoryCache({folder!r}, "reference", {{"num_steps": 3}}, "float32")
schedule = InversionSchedule(torch.tensor([1, 334, 667]), torch.tensor([0.999, 0.9, 0.5, 0.1]))
latents = torch.arange(8 * 64, dtype=torch.float32).reshape(8, 4, 4, 4) / 512
def invert(rows):  # a deterministic stand-in for the reference: every process computes the same numbers
    noise = torch.stack([latents[rows] * (i + 1) for i in range(3)], 1)
    return Trajectory.from_noise(latents[rows], noise, schedule)
for _ in range(20):
    trajectory = cache.trajectories([f"image {{b}}" for b in range(8)], latents, schedule, invert)
    assert torch.equal(trajectory.noise, invert(list(range(8))).noise)
"""


def test_processes_writing_one_folder_at_once_leave_only_whole_entries(tmp_path):
    script = WRITER.format(root=str(ROOT), folder=str(tmp_path / "cache"))
    writers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 8 and not list((tmp_path / "cache").rglob("*.incomplete"))


def test_unknown_cache_dtype_is_named():
    with pytest.raises(ValueError, match="unknown cache dtype 'float16'; choose one of float32, bfloat16"):
        TrajectoryCache("unused", "x", SETTINGS, "float16")
