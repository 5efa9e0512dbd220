"""Disk per image of a trajectory cache entry, measured by writing one with trajectory_cache.TrajectoryCache.

    python benchmarks/cache_disk.py                  # SDXL at 1024 px (latents 4x128x128), N = 80
    python benchmarks/cache_disk.py --side 64 --num_steps 40
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trajectory_cache import DTYPES, TrajectoryCache  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=128, help="Latent side (resolution / 8).")
    parser.add_argument("--num_steps", type=int, default=80, help="Inversion steps N.")
    args = parser.parse_args()
    for dtype in DTYPES:
        for exact in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                cache = TrajectoryCache(folder, "disk", {}, dtype)
                noise = torch.randn(args.num_steps, 4, args.side, args.side)
                entry = {"x0": torch.randn(4, args.side, args.side), "noise": noise.to(cache.dtype)}
                if exact:
                    entry["noise_at_end"] = torch.randn_like(noise).to(cache.dtype)
                cache.store("0" * 64, entry)
                size = cache.path("0" * 64).stat().st_size
            form = "exact form" if exact else "paper form"
            print(f"{dtype:9s} {form}: {size / 1e6:.1f} MB per image (latents 4x{args.side}x{args.side}, "
                  f"N = {args.num_steps})")


if __name__ == "__main__":
    main()
