"""The real trainer through the shipped recipes, measured: peak memory, seconds per step and MFU of `sdxl.sh`,
`sd3.sh` and `flux.sh` as users run them, on full-sized models with random weights (benchmarks/full_models.py; the
real UNet/transformer, text-encoder and VAE shapes, built on the machine, nothing downloaded) and a few synthetic
pairs at 1024 px, for a few steps. One JSON row per run in --results, written as soon as the run ends, also when it
fails (`error`: torch's message, `phase`: where it failed), so that a cut-short session keeps what it measured.

    python benchmarks/trainer_gpu.py                               # every row on the CUDA card, most important first
    python benchmarks/trainer_gpu.py --rows sdxl_full --timeout 300 --steps 3
    python benchmarks/trainer_gpu.py --tiny --work_dir /tmp/tg     # the same sequence on tiny models: a dry run

Rows (issue 22's targets in brackets):
  sdxl_full         sdxl.sh as shipped: full fine-tune, N = 80, 1024 px, bf16, no cache       [reserved <= 64 GiB]
  sdxl_full_cached  the same with a warm trajectory cache (filled first; no reference loaded)  [<= 40 GiB]
  sdxl_lora_cached  sdxl.sh --use_lora with a warm cache                                       [<= 16 GiB]
  sd3_lora          sd3.sh (SD3.5 medium, LoRA)                                                [fits 80 GB]
  flux_lora         flux.sh (FLUX.1-dev, LoRA)                                                 [fits 80 GB]

Per row: peak_reserved_bytes and peak_allocated_bytes (the largest over the run's phases and steps, from
memory_phases.jsonl and metrics.jsonl), seconds_per_step and mfu (median over the steps after the first, whose FLOPs
the trainer counts), the budget the trainer stated before loading the reference (budget_bytes), its phase records,
for cached rows the fill's own peak, and for sdxl_full the profile of its second step (--profile_step 2: top
kernels, the shares of matmul, attention and the rest).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

GIB = 2**30
ROWS = {  # name: (recipe, model kind, warm cache, --use_lora added to the recipe)
    "sdxl_full": ("sdxl.sh", "sdxl", False, False),
    "sdxl_full_cached": ("sdxl.sh", "sdxl", True, False),
    "sdxl_lora_cached": ("sdxl.sh", "sdxl", True, True),
    "sd3_lora": ("sd3.sh", "sd3", False, False),  # sd3.sh trains LoRA by default
    "flux_lora": ("flux.sh", "flux", False, False),  # flux.sh trains LoRA
}


def device_name():
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def model_folder(work, kind, tiny):
    """The row's model, built once per work dir."""
    folder = work / "models" / f"{kind}{'-tiny' if tiny else ''}"
    if not (folder / "model_index.json").exists():
        if tiny:
            from tiny_models import save_tiny_pipeline

            save_tiny_pipeline(kind, str(folder))
        else:
            from full_models import save_full_pipeline

            save_full_pipeline(kind, str(folder))
    return folder


def pairs_manifest(work, resolution, count=4):
    """`count` synthetic pairs (a reddish winner, a bluish loser) at `resolution`, a jsonl manifest."""
    import numpy as np
    from PIL import Image

    folder = work / f"pairs-{resolution}"
    manifest = folder / "pairs.jsonl"
    if not manifest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(count):
            for name, channel in ((f"winner{i}.png", 0), (f"loser{i}.png", 2)):
                pixels = rng.integers(0, 100, (resolution, resolution, 3), dtype=np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(folder / name)
            rows.append({"caption": f"a test image number {i}", "chosen": f"winner{i}.png",
                         "rejected": f"loser{i}.png"})
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def recipe_command(row, args, work, folder, manifest, output, fill=False):
    """(command, environment) of one recipe run."""
    recipe, kind, cached, lora = ROWS[row]
    env = {**os.environ, "MODEL_NAME": str(folder), "DATASET_NAME": str(manifest), "OUTPUT_DIR": str(output),
           "MAX_TRAIN_STEPS": str(args.steps), "CHECKPOINTING_STEPS": "1000000", "LR_WARMUP_STEPS": "0",
           "ACCELERATE_ARGS": "--num_processes 1" + (" --cpu" if args.tiny else ""), "PYTHONUNBUFFERED": "1"}
    if kind == "sdxl":
        env.update(VAE="", VARIANT="")  # the folder's own VAE, bf16 weights without a variant name
    if args.tiny:
        env.update(RESOLUTION="64", NUM_INFERENCE_STEPS="4")
    flags = ["--report_to", "none", "--dataloader_num_workers", "0"]
    if args.peak_tflops:
        flags += ["--peak_tflops", str(args.peak_tflops)]
    if lora:
        flags.append("--use_lora")
    if row == "sdxl_full" and not fill and args.steps >= 2:  # the recipe step profiled (its second: warm)
        flags += ["--profile_step", "2"]
    if cached:
        flags += ["--inversion_cache_dir", str(work / "cache" / row)]
        if fill:
            flags.append("--fill_inversion_cache")
    return ["bash", str(ROOT / recipe), *flags], env


def run(command, env, timeout):
    """(returncode or None on timeout, stderr, seconds); a timed-out run is killed with its process group."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, output, time.perf_counter() - started


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def peaks(output):
    """(allocated, reserved) peak bytes over a run's phases and steps, None on a CPU."""
    phases, steps = read_jsonl(output / "memory_phases.jsonl"), read_jsonl(output / "metrics.jsonl")
    allocated = [p["peak_allocated_gib"] for p in phases] + [s.get("peak_memory_allocated_gib") for s in steps]
    reserved = [p["peak_reserved_gib"] for p in phases] + [s.get("peak_memory_reserved_gib") for s in steps]
    known = [v for v in allocated if v is not None], [v for v in reserved if v is not None]
    return tuple(int(max(v) * GIB) if v else None for v in known)


def failure(code, log):
    """(error, phase) of a failed run: the trainer's last error line, and the phase it names (an out-of-memory
    message does), else the last phase the log completed."""
    if code is None:
        error = "timed out"
    else:
        lines = [line for line in log.splitlines() if line.strip()]
        marked = [line for line in lines if re.search(r"Error|error|out of memory", line)]
        error = (marked or lines or [f"exit code {code}"])[-1].strip()
    named = re.search(r"\(phase ([^)]+)\)", log)
    done = re.findall(r"phase ([a-z ]+?)(?: \(step \d+\))?: [\d.]+ s", log)
    phase = named.group(1) if named else (f"after {done[-1]}" if done else "startup")
    return error[-2000:], phase


def measure_row(row, args, work):
    recipe, kind, cached, lora = ROWS[row]
    result = {"run": row, "device": device_name(), "recipe": recipe, "steps": args.steps, "error": None,
              "phase": None}
    started = time.perf_counter()
    try:
        folder = model_folder(work, kind, args.tiny)
    except Exception as error:  # noqa: BLE001 (a row is written whatever failed)
        return {**result, "error": f"{type(error).__name__}: {error}", "phase": "building the model"}
    result["build_seconds"] = time.perf_counter() - started
    manifest = pairs_manifest(work, 64 if args.tiny else 1024)
    output = work / "runs" / row
    if cached:
        fill_output = work / "runs" / f"{row}-fill"
        command, env = recipe_command(row, args, work, folder, manifest, fill_output, fill=True)
        code, log, seconds = run(command, env, args.timeout)
        result["fill_seconds"] = seconds
        result["fill_peak_allocated_bytes"], result["fill_peak_reserved_bytes"] = peaks(fill_output)
        if code != 0:
            error, phase = failure(code, log)
            return {**result, "error": error, "phase": f"cache fill: {phase}"}
    command, env = recipe_command(row, args, work, folder, manifest, output)
    result["command"] = " ".join(command)
    code, log, seconds = run(command, env, args.timeout)
    result["seconds"] = seconds
    result["peak_allocated_bytes"], result["peak_reserved_bytes"] = peaks(output)
    budget = re.findall(r"expected peak\s+([\d.]+) (GiB|MiB)", log)
    if budget:
        value, unit = budget[-1]
        result["budget_bytes"] = int(float(value) * (GIB if unit == "GiB" else 2**20))
    steps = read_jsonl(output / "metrics.jsonl")
    later = steps[1:] or steps  # the first step is counted for FLOPs (slower) and warms up
    if later:
        result["seconds_per_step"] = statistics.median(s["seconds_per_step"] for s in later)
        mfus = [s["mfu"] for s in later if s.get("mfu") is not None]
        result["mfu"] = statistics.median(mfus) if mfus else None
        result["flops_per_step"] = steps[0].get("flops_per_step")
    else:
        result["seconds_per_step"] = result["mfu"] = None
    result["phases"] = read_jsonl(output / "memory_phases.jsonl")
    profiled = output / "profile_step_2.json"
    if profiled.exists():
        result["profile"] = json.loads(profiled.read_text())
    if code != 0:
        result["error"], result["phase"] = failure(code, log)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "trainer_gpu.jsonl"))
    parser.add_argument("--work_dir", default="/tmp/inversion-dpo-trainer-gpu")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per run")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per process (a fill is one more)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the card's dense bf16 peak (default: the trainer's table by the card's name)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px, N = 4, on the CPU: a dry run")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows:
        result = measure_row(row, args, work)
        with open(args.results, "a") as f:
            f.write(json.dumps(result) + "\n")
        summary = {k: result.get(k) for k in ("run", "peak_reserved_bytes", "budget_bytes", "seconds_per_step",
                                              "mfu", "error", "phase")}
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
