"""Disk per image of the trajectory cache, measured by writing one image's entries through
trajectory_cache.TrajectoryCache (random numbers of SDXL's shapes: latents 4 x side x side, caption states 77 x 2048,
pooled 1280, time_ids 6).

    python benchmarks/cache_disk.py                  # SDXL at 1024 px (latents 4x128x128), N = 80
    python benchmarks/cache_disk.py --side 64 --num_steps 40
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

from models import Conditioning  # noqa: E402
from inversion import InversionSchedule, Trajectory  # noqa: E402
from trajectory_cache import DTYPES, REFERENCE_TARGETS, TrajectoryCache  # noqa: E402


def entry_sizes(dtype, side, num_steps, with_reference_errors):
    """(encoding bytes, trajectory bytes) of one image written to a fresh cache."""
    latents = torch.randn(1, 4, side, side)
    cond = Conditioning(torch.randn(1, 77, 2048), torch.randn(1, 1280), torch.zeros(1, 6))
    schedule = InversionSchedule(torch.arange(num_steps), torch.linspace(0.999, 0.01, num_steps + 1))

    def invert(rows):
        return Trajectory.from_noise(latents[rows], torch.randn(1, num_steps, 4, side, side), schedule)

    def reference_errors(trajectory, rows):
        return {target: torch.rand(1, num_steps) for target in REFERENCE_TARGETS}

    with tempfile.TemporaryDirectory() as folder:
        cache = TrajectoryCache(folder, "disk", {}, dtype)
        cache.encodings(["image"], lambda rows: (latents[rows], cond.select(rows)), "unet", "cpu")
        cache.trajectories(["image"], latents, schedule, invert, reference_errors if with_reference_errors else None)
        return cache.path("image").stat().st_size, cache.path(cache.trajectory_key("image")).stat().st_size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=128, help="Latent side (resolution / 8).")
    parser.add_argument("--num_steps", type=int, default=80, help="Inversion steps N.")
    args = parser.parse_args()
    for dtype in DTYPES:
        for with_errors in (False, True):
            encoding, trajectory = entry_sizes(dtype, args.side, args.num_steps, with_errors)
            form = "exact/anchored forms" if with_errors else "paper form"
            print(f"{dtype:9s} {form}: trajectory {trajectory / 1e6:.2f} MB + encoding {encoding / 1e6:.2f} MB per "
                  f"image (latents 4x{args.side}x{args.side}, N = {args.num_steps})")


if __name__ == "__main__":
    main()
