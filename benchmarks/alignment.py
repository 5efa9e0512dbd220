"""Does each loss form move the toy model toward what is preferred, and how fast? (toy_task.py: red over blue)

For every loss form and seed, train the toy model with train_inversion_dpo.py for a fixed number of optimiser steps,
checkpointing along the way, then measure every checkpoint: the preference rate (fraction of red squares among
samples drawn from fixed seeds) and the held-out denoising loss (does it still model the data?). Two more rows ask
whether the paper form moves at all when nothing breaks the symmetry between policy and reference: no weight decay,
with an fp32 reference and with a bf16 one under bf16 autocast.

    python benchmarks/alignment.py            # 5 forms x 3 seeds + 2 controls x 3 seeds, about 20 min on 2 CPU cores
    python benchmarks/alignment.py --quick    # a smoke run: a rougher toy model, 1 seed, 6 steps, a few minutes

Writes benchmarks/results/alignment{,_quick}.md (table) and .png (preference rate against steps and seconds),
and the raw numbers as .json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import toy_task  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FORMS = ["inversion_dpo", "inversion_dpo_official", "inversion_dpo_exact", "diffusion_dpo", "sft"]
CONTROLS = {  # name -> extra trainer flags
    "inversion_dpo, no weight decay, fp32 reference": ["--loss_type", "inversion_dpo", "--adam_weight_decay", "0"],
    "inversion_dpo, no weight decay, bf16 autocast": ["--loss_type", "inversion_dpo", "--adam_weight_decay", "0",
                                                      "--mixed_precision", "bf16"],
}
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194)]


def train(toy_dir, run_dir, flags, steps, every, seed):
    command = [sys.executable, str(ROOT / "train_inversion_dpo.py"),
               "--pretrained_model_name_or_path", str(toy_dir / "model"),
               "--dataset_name", str(toy_dir / "pairs" / "pairs.jsonl"), "--output_dir", str(run_dir),
               "--resolution", "32", "--no_hflip", "--num_inference_steps", "10", "--inversion_guidance_scale", "1",
               "--trajectory_chunk_size", "10", "--beta_dpo", "500", "--learning_rate", "5e-5",
               "--lr_scheduler", "constant", "--train_batch_size", "8", "--max_train_steps", str(steps),
               "--checkpointing_steps", str(every), "--report_to", "none", "--mixed_precision", "no",
               "--seed", str(seed), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in metrics}


def measure(toy_dir, folder, samples):
    pipe = toy_task.load_pipeline(toy_dir / "model", folder)
    rate = toy_task.is_red(toy_task.sample(pipe, samples, seed=0)).float().mean().item()
    return rate, toy_task.heldout_denoising_loss(pipe)


def run_config(toy_dir, work, name, flags, seed, steps, every, samples):
    run_dir = work / f"{name.replace(' ', '_').replace(',', '')}-seed{seed}"
    metrics = train(toy_dir, run_dir, flags, steps, every, seed)
    points = []
    for step in range(every, steps + 1, every):
        rate, heldout = measure(toy_dir, run_dir / f"checkpoint-{step}", samples)
        points.append({"step": step, "seconds": metrics[step]["elapsed_s"], "preference_rate": rate,
                       "heldout_loss": heldout, "grad_norm_step1": metrics[1]["grad_norm"]})
    print(f"  {name} seed {seed}: preference rate {points[-1]['preference_rate']:.1%} after {steps} steps",
          flush=True)
    return points


def first_reaching(points, threshold, key):
    return next((p[key] for p in points if p["preference_rate"] >= threshold), None)


def summarise(name, runs, base_rate, threshold):
    final = np.array([r[-1]["preference_rate"] for r in runs])
    heldout = np.array([r[-1]["heldout_loss"] for r in runs])
    reach_steps = [first_reaching(r, threshold, "step") for r in runs]
    reach_seconds = [first_reaching(r, threshold, "seconds") for r in runs]
    reached = [s for s in reach_steps if s is not None]

    def mean_or_dash(values, fmt):
        values = [v for v in values if v is not None]
        return fmt.format(np.mean(values)) if values else "-"

    return (f"| {name} | {final.mean():.1%} ± {final.std():.1%} | {final.mean() - base_rate:+.1%} | "
            f"{len(reached)}/{len(runs)} | {mean_or_dash(reach_steps, '{:.0f}')} | "
            f"{mean_or_dash(reach_seconds, '{:.1f}')} | {heldout.mean():.4f} | "
            f"{np.mean([r[0]['grad_norm_step1'] for r in runs]):.3g} |")


def plot(series, path, base_rate):
    """Preference rate against steps (left) and seconds (right), one line per configuration (mean over seeds)."""
    width, height, margin = 1100, 520, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel = (width - 3 * margin) // 2
    for index, (key, label) in enumerate((("step", "optimiser steps"), ("seconds", "training seconds"))):
        x0, y0, x1, y1 = margin + index * (panel + margin), margin, margin + index * (panel + margin) + panel, height - 2 * margin
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0 + panel // 2 - 40, y1 + 25), label, fill="black")
        draw.text((x0, y0 - 20), "preference rate (fraction red)", fill="black")
        x_max = max(max(p[key] for p in points) for points in series.values()) or 1
        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y1 - fraction * (y1 - y0)
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((x0 - 38, y - 6), f"{fraction:.2f}", fill="black")
        base_y = y1 - base_rate * (y1 - y0)
        draw.line((x0, base_y, x1, base_y), fill=(160, 160, 160))
        for colour, points in zip(COLOURS, series.values()):
            xy = [(x0, base_y)] + [(x0 + p[key] / x_max * panel, y1 - p["preference_rate"] * (y1 - y0)) for p in points]
            draw.line(xy, fill=colour, width=3)
        draw.text((x1 - 60, y1 + 8), f"{x_max:.0f}", fill="black")
    for row, (colour, name) in enumerate(zip(COLOURS, series)):
        x, y = margin + (row % 2) * 520, height - 2 * margin + 45 + (row // 2) * 16
        draw.line((x, y + 6, x + 20, y + 6), fill=colour, width=3)
        draw.text((x + 26, y), name, fill="black")
    image.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a rougher toy model, 1 seed, 6 steps")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS), help="losses to compare (default: all)")
    parser.add_argument("--work_dir", default=None, help="where models and runs go (default: a folder in /tmp)")
    parser.add_argument("--results_dir", default=str(RESULTS), help="where the table, plot and numbers go")
    args = parser.parse_args()
    quick = args.quick
    seeds = [0] if quick else [0, 1, 2]
    steps, every, samples = (6, 6, 32) if quick else (60, 15, 256)
    threshold = 0.75
    work = Path(args.work_dir or f"/tmp/inversion-dpo-alignment{'-quick' if quick else ''}")
    toy_dir = work / "toy"
    started = time.perf_counter()
    build_steps = dict(vae_steps=40, unet_steps=150) if quick else {}
    toy_task.build_model(toy_dir / "model", progress=lambda it, desc=None: it, **build_steps)
    toy_task.build_pairs(toy_dir / "pairs")
    base_rate, base_heldout = measure(toy_dir, None, samples)
    print(f"toy model ready: base preference rate {base_rate:.1%}", flush=True)

    configs = {form: ["--loss_type", form] for form in args.forms}
    if not quick:
        configs.update(CONTROLS)
    results = {name: [run_config(toy_dir, work / "runs", name, flags, seed, steps, every, samples) for seed in seeds]
               for name, flags in configs.items()}

    suffix = "_quick" if quick else ""
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"alignment{suffix}.json").write_text(json.dumps(
        {"base_rate": base_rate, "base_heldout_loss": base_heldout, "runs": results}, indent=1))
    lines = [
        f"Toy task (`toy_task.py`): preference rate = fraction of red squares in {samples} samples from fixed seeds; "
        f"base model {base_rate:.1%}, held-out denoising loss {base_heldout:.4f}. {steps} optimiser steps of 8 pairs, "
        f"AdamW lr 5e-5 (weight decay 1e-2 unless stated), beta 500, 10 inversion steps, guidance 1; "
        f"mean ± std over seeds {seeds}.",
        "",
        f"| configuration | final rate | change | runs reaching {threshold:.0%} | steps to {threshold:.0%} | "
        f"seconds to {threshold:.0%} | held-out loss | grad norm, step 1 |",
        "|---|---|---|---|---|---|---|---|",
        *[summarise(name, runs, base_rate, threshold) for name, runs in results.items()],
        "",
        f"Total benchmark time {time.perf_counter() - started:.0f} s.",
    ]
    (results_dir / f"alignment{suffix}.md").write_text("\n".join(lines) + "\n")
    mean_series = {name: [{key: float(np.mean([r[i][key] for r in runs])) for key in ("step", "seconds",
                                                                                       "preference_rate")}
                          for i in range(len(runs[0]))] for name, runs in results.items()}
    plot(mean_series, results_dir / f"alignment{suffix}.png", base_rate)
    print("\n".join(lines))
    print(f"wrote {results_dir}/alignment{suffix}.md, .png, .json")


if __name__ == "__main__":
    main()
