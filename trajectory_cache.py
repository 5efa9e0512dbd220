"""A content-addressed disk cache of everything a training step needs that does not depend on the policy.

Two entries per image, each one safetensors file named by a hash:

* encoding: x_0 (the VAE latent) and the caption's conditioning row, keyed by what determines them before any model
  runs: the preprocessed pixels (after crop and flip), the caption, SDXL's original size and crop, the target size,
  and fingerprints of the VAE and text encoders (their values, not their names) with the latents' scaling. With it a
  step runs no VAE and no text encoder; Diffusion-DPO uses this entry alone.
* trajectory: the reference's inversion noise e_1..e_N (velocities v_i for flows) in the cache dtype, and for the
  exact and anchored forms the reference's per-step squared errors at x_i against each target (2N numbers: all those
  forms need of the reference), keyed by the encoding's key, the reference's fingerprint and the inversion and loss
  settings. x_1..x_N are rebuilt from x_0 and the stored noise with the step the inversion used, and the reference's
  errors are taken at those rebuilt points, so a hit and a miss give the same numbers; a float32 cache reproduces an
  uncached run bit for bit. A bfloat16 cache halves the disk (SDXL 1024 px, N = 80: about 10.5 MB an image) and
  rounds the stored noise to bfloat16.

With both entries on disk a step runs nothing but the policy. Entries are written to a scratch file and renamed, so
a killed write never leaves a half entry under a real name, and several processes and runs can share one folder (the
same key always holds the same numbers); an unreadable or malformed entry is logged, recomputed and rewritten.
"""

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models import Conditioning
from inversion import Trajectory

logger = logging.getLogger(__name__)

FORMAT = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REFERENCE_TARGETS = ("step", "anchored")  # the targets the reference's errors are stored against
CONDITIONING_FIELDS = ("prompt_embeds", "pooled_prompt_embeds", "time_ids")


def weights_fingerprint(module, dtype):
    """sha256 of a module's weights as they compute (cast to `dtype`), name by name."""
    hasher = hashlib.sha256(str(dtype).encode())
    for name, tensor in sorted(module.state_dict().items()):
        values = tensor.detach().to("cpu", dtype)
        hasher.update(name.encode())
        hasher.update(values.view(torch.int16 if values.element_size() == 2 else torch.int32).numpy().tobytes())
    return hasher.hexdigest()


def _stacked(entries, name, device):
    """One field of every entry (read ones on the CPU, fresh ones where they were computed), stacked on `device`."""
    return torch.stack([entry[name].to(device) for entry in entries])


def _json_bytes(value):
    return json.dumps(value, sort_keys=True).encode()


class TrajectoryCache:
    """Encodings and trajectories on disk under `folder`.

    `encoders`: what fixes an image's encoding besides its pixels and caption (fingerprints of the VAE and text
    encoders, the latents' scaling, the model kind); `fingerprint` and `settings`: the reference's weights and the
    inversion and loss settings that fix a trajectory."""

    def __init__(self, folder, fingerprint, settings, dtype="bfloat16", encoders=None):
        if dtype not in DTYPES:
            raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
        self.encoding_prefix = _json_bytes({"format": FORMAT, "entry": "encoding", "encoders": encoders or {}})
        self.trajectory_prefix = _json_bytes({"format": FORMAT, "entry": "trajectory", "reference": fingerprint,
                                              "dtype": dtype, **settings})
        self.hits = self.misses = self.encoding_hits = self.encoding_misses = self.repaired = 0

    # -- keys and files -------------------------------------------------------------------------------------------
    def image_key(self, pixels, caption, ids=()):
        """The encoding key of one image: its preprocessed `pixels` (C, H, W), `caption` and `ids` (JSON-able: SDXL's
        original size, crop and target size)."""
        hasher = hashlib.sha256(self.encoding_prefix)
        hasher.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        hasher.update(_json_bytes([caption, ids]))
        return hasher.hexdigest()

    def trajectory_key(self, image_key):
        return hashlib.sha256(self.trajectory_prefix + image_key.encode()).hexdigest()

    def path(self, key):
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key, check):
        """The stored tensors of `key`, or None when absent; `check(entry)` raises ValueError for an entry that does
        not hold what is needed. A damaged entry is logged and treated as absent."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))
            check(entry)
        except (SafetensorError, OSError, ValueError) as error:
            logger.warning("damaged trajectory cache entry %s (%s): recomputing it", path, error)
            self.repaired += 1
            return None
        return entry

    def store(self, key, entry):
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete")  # unique across machines too
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in entry.items()}, str(scratch))
        os.replace(scratch, path)

    # -- encodings --------------------------------------------------------------------------------------------
    def encodings(self, keys, encode, kind, device):
        """(latents (B, C, H, W) float32, `Conditioning`) of the images with encoding `keys`: read from disk, or
        computed by `encode(rows)` (the latents and conditioning of those rows) and stored, as they are."""

        def check(entry):
            if "x0" not in entry or "prompt_embeds" not in entry:
                raise ValueError(f"holds {sorted(entry)}, not an encoding")

        entries = [self.load(key, check) for key in keys]
        missing = [b for b, entry in enumerate(entries) if entry is None]
        self.encoding_hits += len(keys) - len(missing)
        self.encoding_misses += len(missing)
        if missing:
            latents, cond = encode(missing)
            for row, b in enumerate(missing):
                entry = {"x0": latents[row]}
                entry.update({name: field[row] for name, field in zip(CONDITIONING_FIELDS, cond._fields())
                              if field is not None})
                self.store(keys[b], entry)
                entries[b] = entry
        latents = _stacked(entries, "x0", device)
        fields = [_stacked(entries, name, device) if name in entries[0] else None for name in CONDITIONING_FIELDS]
        return latents, Conditioning(*fields, kind=kind)

    # -- trajectories -----------------------------------------------------------------------------------------
    def trajectories(self, keys, latents, schedule, invert, reference_errors=None):
        """The `Trajectory` of every image (encoding `keys`, clean latents (B, C, H, W)): its noise read from disk, or
        computed by `invert(rows)` (a Trajectory of those rows) and stored. Either way the noise goes through the
        cache's dtype and x_1..x_N are rebuilt from it. With `reference_errors` (a function of a Trajectory and its
        rows, returning {target: (rows, N)} for every REFERENCE_TARGETS), those errors too, taken at the rebuilt
        points of a miss and stored."""
        num_steps = schedule.num_steps
        needed = {"noise"} | ({f"reference_errors_{t}" for t in REFERENCE_TARGETS} if reference_errors else set())

        def check(entry):
            if not needed <= set(entry) or entry["noise"].shape[0] != num_steps:
                raise ValueError(f"holds {sorted(entry)} with {entry.get('noise', torch.empty(0)).shape[:1]} steps, "
                                 f"needs {sorted(needed)} with {num_steps}")

        trajectory_keys = [self.trajectory_key(key) for key in keys]
        entries = [self.load(key, check) for key in trajectory_keys]
        missing = [b for b, entry in enumerate(entries) if entry is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            noise = invert(missing).noise.to(self.dtype)
            errors = {}
            if reference_errors:
                errors = reference_errors(Trajectory.from_noise(latents[missing], noise, schedule), missing)
            for row, b in enumerate(missing):
                entry = {"noise": noise[row], **{f"reference_errors_{t}": errors[t][row] for t in errors}}
                self.store(trajectory_keys[b], entry)
                entries[b] = entry
        device = latents.device
        trajectory = Trajectory.from_noise(latents, _stacked(entries, "noise", device), schedule)
        if reference_errors:
            trajectory.reference_errors = {t: _stacked(entries, f"reference_errors_{t}", device)
                                           for t in REFERENCE_TARGETS}
        return trajectory

    def summary(self):
        return {"cache_hits": self.hits, "cache_misses": self.misses, "cache_repaired": self.repaired,
                "encoding_cache_hits": self.encoding_hits, "encoding_cache_misses": self.encoding_misses}
