"""A content-addressed disk cache of inversion trajectories (DDIM, or Euler for flows).

A trajectory depends only on the image latents, the caption's conditioning, the reference weights and the inversion
settings, never on the policy being trained, so it can be computed once and reused across epochs and runs. An entry's
name is a hash of all of those: the latents' and conditioning's bytes, a fingerprint of the reference weights
(their values, not their name) and the settings. Each entry is one safetensors file holding x_0, the noise e_1..e_N
and, for the exact form, eps_ref(x_i, tau_i); x_1..x_N are rebuilt from x_0 and e_i with the same step the
inversion used, so a float32 cache gives bit-for-bit the trajectory of an uncached run. A bfloat16 cache halves the
disk (SDXL 1024 px, N = 80: about 10.7 MB an image) and rounds the stored noise to bfloat16.

Entries are written to a scratch file and renamed, so a killed write never leaves a half entry under a real name;
an unreadable or malformed entry is logged, recomputed and rewritten.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from inversion import Trajectory

logger = logging.getLogger(__name__)

FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def weights_fingerprint(module, dtype):
    """sha256 of a module's weights as the reference computes with them (cast to `dtype`), name by name."""
    hasher = hashlib.sha256(str(dtype).encode())
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to("cpu", dtype)
        hasher.update(name.encode())
        hasher.update(values.view(torch.int16 if values.element_size() == 2 else torch.int32).numpy().tobytes())
    return hasher.hexdigest()


def _tensor_bytes(tensor):
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


class TrajectoryCache:
    """Trajectories on disk under `folder`, for one reference (`fingerprint`) and one set of inversion `settings`."""

    def __init__(self, folder, fingerprint, settings, dtype="bfloat16"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
        self.prefix = json.dumps({"format": FORMAT, "reference": fingerprint, "dtype": dtype, **settings},
                                 sort_keys=True).encode()
        self.hits = self.misses = self.repaired = 0

    def key(self, latents, cond, index):
        """The entry name of image `index`: a hash of its latents, its conditioning row and the cache's prefix."""
        hasher = hashlib.sha256(self.prefix)
        hasher.update(_tensor_bytes(latents[index]))
        for field in cond.select(slice(index, index + 1))._fields():
            if field is not None:
                hasher.update(_tensor_bytes(field))
        return hasher.hexdigest()

    def path(self, key):
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key, num_steps, with_noise_at_end):
        """The stored tensors of `key`, or None when absent; a damaged entry is logged and treated as absent."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))
            expected = {"x0", "noise"} | ({"noise_at_end"} if with_noise_at_end else set())
            if not expected <= set(entry) or entry["noise"].shape[0] != num_steps:
                raise ValueError(f"holds {sorted(entry)} with {entry.get('noise', torch.empty(0)).shape[:1]} steps")
        except (SafetensorError, OSError, ValueError) as error:
            logger.warning("damaged trajectory cache entry %s (%s): recomputing it", path, error)
            self.repaired += 1
            return None
        return entry

    def store(self, key, entry):
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.incomplete")
        save_file({name: tensor.contiguous().cpu() for name, tensor in entry.items()}, str(scratch))
        os.replace(scratch, path)

    def trajectories(self, latents, cond, schedule, with_noise_at_end, invert):
        """The `Trajectory` of every image in `latents` (B, C, H, W): read from disk, or computed by
        `invert(rows)` (a Trajectory of those rows) and stored first. Either way the noise goes through the cache's
        dtype and x_1..x_N are rebuilt from it, so a hit and a miss give the same numbers."""
        num_steps = schedule.num_steps
        keys = [self.key(latents, cond, b) for b in range(len(latents))]
        entries = [self.load(key, num_steps, with_noise_at_end) for key in keys]
        missing = [b for b, entry in enumerate(entries) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = invert(missing)
            for row, b in enumerate(missing):
                entry = {"x0": computed.latents[row, 0], "noise": computed.noise[row].to(self.dtype)}
                if with_noise_at_end:
                    entry["noise_at_end"] = computed.noise_at_end[row].to(self.dtype)
                self.store(keys[b], entry)
                entries[b] = entry
        device = latents.device
        noise = torch.stack([entry["noise"] for entry in entries]).to(device, torch.float32)
        points = [torch.stack([entry["x0"] for entry in entries]).to(device, torch.float32)]
        for i in range(num_steps):
            points.append(schedule.step(points[-1], noise[:, i], i))
        at_end = None
        if with_noise_at_end:
            at_end = torch.stack([entry["noise_at_end"] for entry in entries]).to(device, torch.float32)
        return Trajectory(torch.stack(points, 1), noise, schedule, at_end)

    def summary(self):
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_repaired": self.repaired}
