"""What keeps one training run apart from every other: the settings that define it, one run per output folder, the
history of its starts, and checkpoints that can be checked before they are trusted.

A run is defined by the flags in `RUN_DEFINING` (with the model's fingerprint, the data's size, the number of
processes, the distributed backend and the precision). Every checkpoint records them; resuming with any of them
changed stops before a model loads, unless --allow_changed_settings. The flags in `RESUMABLE` may change on resume.
Every flag of the trainer is in exactly one of the two (tests/test_runs.py checks).
"""

import hashlib
import importlib.metadata
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("train_inversion_dpo")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it is ignored on resume
CONFIG_FILE = "training_config.json"  # the first start's flags, never overwritten
HISTORY_FILE = "run_history.jsonl"  # one line per start: settings, changes, code and library versions, device, step

RUN_DEFINING = (
    # the model
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant", "sdxl",
    "max_sequence_length", "no_t5", "use_lora", "rank", "lora_alpha", "lora_target_modules",
    # the data
    "dataset_name", "train_data_dir", "dataset_config_name", "dataset_split", "streaming", "max_train_samples",
    "caption_column", "winner_column", "loser_column", "image_0_column", "image_1_column", "label_column",
    "resolution", "random_crop", "no_hflip",
    # the inversion and the loss
    "num_inference_steps", "inversion_steps_offset", "inversion_guidance_scale", "anchor_points", "loss_type",
    "beta_dpo", "relative_beta", "timestep_weighting", "loss_timesteps", "loss_timestep_sampling",
    "loss_guidance_scale", "init_perturbation",
    # the batch, the optimiser's kind, the seed and the precision
    "train_batch_size", "gradient_accumulation_steps", "use_adafactor", "use_8bit_adam", "seed", "mixed_precision",
)
RESUMABLE = (
    # how long and how fast
    "max_train_steps", "num_train_epochs", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
    "max_nonfinite_steps", "max_bad_fraction",
    # checkpoints, logging, validation, output
    "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "allow_changed_settings", "overwrite_output_dir", "save_pipeline", "push_to_hub", "hub_model_id", "hub_token",
    "report_to", "logging_dir", "tracker_project_name", "validation_prompts", "validation_steps",
    "validation_seeds", "validation_guidance_scale", "validation_num_inference_steps",
    # where things are stored and how fast they compute (the same numbers, up to rounding)
    "cache_dir_model", "cache_dir", "dataloader_num_workers", "inversion_cache_dir", "inversion_cache_dtype",
    "fill_inversion_cache", "allow_tf32", "gradient_checkpointing", "enable_xformers_memory_efficient_attention",
    "trajectory_chunk_size", "torch_compile", "torch_compile_backend", "torch_compile_mode", "memory_budget",
    "memory_limit_gib", "profile_step", "peak_tflops",
)
# What a run writes into its output folder (a new run into a folder holding any of these stops; --overwrite_output_dir
# removes them): checkpoints, records, metrics, the model (full, LoRA or the whole pipeline), the card, images, logs.
RUN_ENTRIES = ("checkpoint-*", ".incomplete-checkpoint-*", CONFIG_FILE, HISTORY_FILE, "metrics.jsonl",
               "memory_phases.jsonl", "profile_step_*", "validation", "unet", "transformer",
               "pytorch_lora_weights.safetensors", "README.md", "model_index.json", "scheduler", "vae",
               "text_encoder*", "tokenizer*")
# Entries that show a run has trained here (a folder with only a memory log or an empty logs/ holds no run).
RUN_MARKERS = ("checkpoint-*", CONFIG_FILE, HISTORY_FILE, "metrics.jsonl", "unet", "transformer",
               "pytorch_lora_weights.safetensors")
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "safetensors", "huggingface_hub")
SAMPLED_BYTES = 1 << 20  # the model fingerprint reads this much from the start, middle and end of each weights file


# ----------------------------------------------------------------------------------------------------------------
# The settings that define a run
# ----------------------------------------------------------------------------------------------------------------


def model_fingerprint(name_or_path, revision=None, cache_dir=None):
    """A quick fingerprint of a model's files, without loading it: every config's text, and each weights file's name,
    size and sampled bytes (start, middle, end). A hub id is looked up in the local cache only; None when absent."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                            local_files_only=True))
        except Exception:  # not downloaded yet (a first start), or not a hub id
            return None
    hasher = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if file.suffix == ".json" or file.suffix == ".txt":
            hasher.update(relative.encode() + b"\0" + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".gguf"):
            size = file.stat().st_size
            hasher.update(f"{relative}\0{size}\0".encode())
            with file.open("rb") as f:
                for offset in sorted({0, max(0, size // 2 - SAMPLED_BYTES // 2), max(0, size - SAMPLED_BYTES)}):
                    f.seek(offset)
                    hasher.update(f.read(SAMPLED_BYTES))
    return hasher.hexdigest()


def run_settings(args, num_processes, distributed_type, precision, dataset_size, fingerprint):
    """The settings that define the run, as JSON values: the flags of `RUN_DEFINING` and what the launch and the
    data fix. `precision`: the accelerator's (a launch config can set it beside --mixed_precision)."""
    settings = {name: getattr(args, name, None) for name in RUN_DEFINING}
    settings.update(mixed_precision=precision, model_fingerprint=fingerprint, dataset_size=dataset_size,
                    num_processes=num_processes, distributed_type=str(getattr(distributed_type, "value", distributed_type)))
    return json.loads(json.dumps(settings, default=str))  # tuples as lists, as they come back from a file


def setting_changes(recorded, current):
    """[(name, recorded value, current value)] for every setting that differs. The model's path may move when its
    fingerprint is the same (a model copied to another disk is the same model)."""
    changes = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        if old == new:
            continue
        if name == "pretrained_model_name_or_path" and recorded.get("model_fingerprint") is not None and \
                recorded.get("model_fingerprint") == current.get("model_fingerprint"):
            continue
        if name == "model_fingerprint" and (old is None or new is None):
            continue  # unknown on one side (a hub model not in the local cache): the model's name is compared
        changes.append((name, old, new))
    return changes


def describe_changes(changes, where="the checkpoint"):
    return "; ".join(f"{name}: {old!r} in {where}, {new!r} now" for name, old, new in changes)


def recorded_settings(resume_from, history):
    """(the settings to compare with, where they come from): the resumed checkpoint's, or, restarting a run that
    wrote no checkpoint, its last start's; (None, None) for a new run or a checkpoint that records none."""
    if resume_from is not None:
        settings = read_checkpoint_record(resume_from).get("settings")
        if settings is None:
            logger.warning("%s records no settings (it was written before checkpoints recorded them): the run's "
                           "settings cannot be checked against it", resume_from)
        return settings, "the checkpoint"
    earlier = starts(history)
    return (earlier[-1]["settings"], "the run's last start") if earlier else (None, None)


def check_settings(recorded, settings, where, output_dir, allowed):
    """The changes from `recorded` to `settings`; raises ValueError naming each unless `allowed`, else logs each."""
    changes = setting_changes(recorded, settings) if recorded else []
    if changes and not allowed:
        raise ValueError(
            f"resuming {output_dir} with settings that define the run changed: {describe_changes(changes, where)}. "
            "Resume with the run's settings, start a new run in another --output_dir, or give "
            "--allow_changed_settings if the change is intended (it is then recorded in the run's history)")
    for name, old, new in changes:
        logger.warning("--allow_changed_settings: %s changes from %r (in %s) to %r", name, old, where, new)
    return changes


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checkpoint_record(folder, global_step, settings):
    """checkpoint_complete.json, written last: the step, the run's settings, and each file's size and sha256."""
    folder = Path(folder)
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_COMPLETE):
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": file_digest(file)}
    record = {"global_step": global_step, "settings": settings, "files": files}
    (folder / CHECKPOINT_COMPLETE).write_text(json.dumps(record, indent=1))


def read_checkpoint_record(folder):
    return json.loads((Path(folder) / CHECKPOINT_COMPLETE).read_text())


def checkpoint_problems(folder):
    """What is wrong with a checkpoint's files against its record: [] when intact. A record without file entries (a
    checkpoint written before they were recorded) cannot be checked and counts as intact."""
    folder = Path(folder)
    try:
        record = read_checkpoint_record(folder)
    except (OSError, ValueError) as error:
        return [f"{CHECKPOINT_COMPLETE} unreadable ({error})"]
    problems = []
    for name, expected in record.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {expected['size']} were written")
        elif file_digest(file) != expected["sha256"]:
            problems.append(f"{name} has other contents than were written (sha256 differs)")
    return problems


def checkpoints(output_dir):
    """checkpoint-N folders whose save finished (their record is present), oldest first."""
    found = []
    for entry in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and (entry / CHECKPOINT_COMPLETE).is_file():
            found.append((int(match.group(1)), entry))
        elif match:
            logger.warning("ignoring %s: its save did not finish (no %s)", entry, CHECKPOINT_COMPLETE)
    return [path for _, path in sorted(found)]


def checkpoint_step(path):
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-N folder")
    return int(match.group(1))


def resume_checkpoint(output_dir, requested):
    """The checkpoint to resume from: `requested` ("latest" or a folder), checked against its record. "latest": the
    newest intact one, each damaged one newer than it named in a warning; None when the folder has no checkpoint.
    Raises ValueError naming the problem for a named checkpoint that is missing, unfinished or damaged, and for
    "latest" when every checkpoint is damaged."""
    if requested != "latest":
        path = Path(requested)
        if not (path / CHECKPOINT_COMPLETE).is_file():
            raise ValueError(f"--resume_from_checkpoint {path}: not a completed checkpoint folder (no "
                             f"{CHECKPOINT_COMPLETE}); give a checkpoint-N folder of the run, or latest")
        problems = checkpoint_problems(path)
        if problems:
            raise ValueError(f"--resume_from_checkpoint {path} is damaged: {'; '.join(problems)}. Resume from an "
                             f"earlier checkpoint, or --resume_from_checkpoint latest for the newest intact one")
        checkpoint_step(path)
        return path
    found = checkpoints(output_dir)
    for path in reversed(found):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("%s is damaged (%s): trying the checkpoint before it", path, "; ".join(problems))
    if found:
        raise ValueError(f"every checkpoint in {output_dir} is damaged ({', '.join(p.name for p in found)}); "
                         "nothing was changed. Start again with --overwrite_output_dir, or another --output_dir")
    return None


# ----------------------------------------------------------------------------------------------------------------
# The output folder and its history
# ----------------------------------------------------------------------------------------------------------------


def _entries(output_dir, patterns):
    folder = Path(output_dir)
    return sorted({entry for pattern in patterns for entry in folder.glob(pattern)}) if folder.is_dir() else []


def run_entries(output_dir):
    """What an earlier run left in the folder (empty: a new run may start here)."""
    return _entries(output_dir, RUN_MARKERS)


def clear_run(output_dir, logging_dir):
    """Remove what a run writes (`RUN_ENTRIES` and its tracker logs), nothing else; returns the names removed."""
    removed = []
    for entry in _entries(output_dir, (*RUN_ENTRIES, logging_dir)):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed.append(entry.name)
    return removed


def read_history(output_dir):
    file = Path(output_dir) / HISTORY_FILE
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.is_file() else []


def append_record(output_dir, record):
    """One line of run_history.jsonl: a start (`start_record`) or the end of one (`end_record`)."""
    with open(Path(output_dir) / HISTORY_FILE, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def starts(history):
    return [record for record in history if "start" in record]


def ended_at(history):
    """The step at which the run's last start ended with its model saved; None when it did not (or never started)."""
    last = history[-1] if history else {}
    return last.get("step") if "end" in last else None


def end_record(number, step):
    return {"end": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step}


def code_version():
    """The git commit of this code (with "-dirty" when files differ from it); None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def library_versions():
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


SECRET_FLAGS = ("hub_token",)


def recorded_flags(args):
    """Every flag's value, as written to the run's records (which --push_to_hub uploads): secrets left out."""
    return {name: "<not recorded>" if name in SECRET_FLAGS and value is not None else value
            for name, value in vars(args).items()}


def recorded_command(argv):
    """The command line, a secret flag's value left out."""
    command = list(argv)
    for i, word in enumerate(command):
        for name in SECRET_FLAGS:
            if word == f"--{name}" and i + 1 < len(command):
                command[i + 1] = "<not recorded>"
            elif word.startswith(f"--{name}="):
                command[i] = f"--{name}=<not recorded>"
    return command


def start_record(number, settings, changes, start_step, resumed_from, device, flags):
    """One line of the run history: which start, from which step and checkpoint, the run's settings and what changed
    from the checkpoint's, every flag, the code and library versions, the device, the command line."""
    return {"start": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": start_step,
            "resumed_from": None if resumed_from is None else str(resumed_from),
            "changed": [{"setting": name, "checkpoint": old, "now": new} for name, old, new in changes],
            "settings": settings, "flags": flags, "code_version": code_version(), "libraries": library_versions(),
            "device": device, "command": recorded_command(sys.argv)}
