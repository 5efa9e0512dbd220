"""Do the recommended settings transfer to properties nobody tuned them for? (Issue: settings that transfer.)

The alignment study (benchmarks/alignment.py) chose each form's beta and learning rate on the colour task. Here
every form runs at those recommended settings, untuned, on toy properties of other kinds (toy_task.PROPERTIES), each
with its own base model trained with the property varying 50/50 and its own pairs and swapped pairs:

- background: a light background preferred over a dark one (a square of either colour on it);
- count: two squares preferred over one;
- position (development only): the square in the left half preferred over the right half.

The colour and position properties are the development set: the anchored form's beta rule was chosen on them. The
background and count properties are the held-out set: they were built once and never used to choose anything; the
study reports them as they came out. Each configuration is trained for the preference and against it (pairs
swapped), training seeds 0, 1, 2, 60 AdamW steps of 8 pairs (480 of 512 pairs, none repeated), N = 10, guidance 1;
effect = preferred-attribute rate trained for it minus trained against it, on 256 samples (sampling seed 0, read from
the pixels by toy_task's detectors), with the 95% t-interval over seeds; the base model's rate shows whether either
side moved the wrong way; held-out denoising loss on fresh images of both values. One diagnostic row runs the default
anchored loss at forward noisings of x_0 instead of the inversion path (--anchor_points noised), to separate the
path from the rest of the loss. Then `explain` (benchmarks/why.py's decomposition, held-out errors on fresh images
of both values, and where the inversion ends).

    python benchmarks/transfer.py --work_dir /tmp/transfer             # the study (resumable), ~30 min on 2 cores
    python benchmarks/transfer.py --work_dir /tmp/transfer --dev       # the development runs on position + colour
    python benchmarks/transfer.py --quick --work_dir DIR               # smoke run: rough toys, 1 seed, 2 steps

Writes benchmarks/results/transfer{,_dev,_quick}.{md,json,png}: transfer.json holds a list of rows with property,
configuration, effect, interval, for_rate, against_rate, base_rate, heldout_loss (and the per-seed values).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

from alignment import RESULTS, Study, effect_of, fmt, interval, measure_base, name_of, plot_effect  # noqa: E402

# background and count were held out from every choice of setting; the standardised candidate's direction came from
# diagnosing the default on them (the noised diagnostic), so size and orientation were added after it was chosen
# (on position and colour): seen by no choice at all.
HELD_OUT = ("background", "count", "size", "orientation")
DEVELOPMENT = ("position", "colour")
# Every form at the settings the project recommends (docs/study.md, "Choosing a loss"), untuned here. `beta` "rule": the
# trainer's default for the anchored form (--beta_dpo unset).
RECOMMENDED = [
    {"name": "inversion_dpo_x0, plain inversion path, rule, 1 stratified loss step per pair (the default before)", "loss": "inversion_dpo_x0",
     "weighting": "official", "beta": "rule", "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 50, 1 stratified loss step per pair (the previous default)",
     "loss": "inversion_dpo_x0", "weighting": "official", "beta": 50, "lr": 1e-4, "loss_timesteps": 1,
     "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 50, every step", "loss": "inversion_dpo_x0", "weighting": "official",
     "beta": 50, "lr": 1e-4},
    {"name": "inversion_dpo_x0, standardised points, rule, 1 stratified loss step per pair (the default now)",
     "loss": "inversion_dpo_x0", "weighting": "official", "beta": "rule", "lr": 1e-4, "loss_timesteps": 1,
     "sampling": "stratified", "anchor_points": "standardised"},
    {"name": "diffusion_dpo, beta 500", "loss": "diffusion_dpo", "weighting": "-", "beta": 500, "lr": 1e-4},
    {"name": "sft", "loss": "sft", "weighting": "-", "beta": None, "lr": 1e-4},
    {"name": "inversion_dpo (paper form), beta 50", "loss": "inversion_dpo", "weighting": "official", "beta": 50,
     "lr": 1e-4},
    {"name": "inversion_dpo_exact, beta 50000, lr 1e-7", "loss": "inversion_dpo_exact", "weighting": "official",
     "beta": 50000, "lr": 1e-7},
]
# a diagnostic, not a recommendation: the anchored form exactly as the default (rule, one stratified step, official
# weights) but at fresh forward noisings of x_0 at the inversion's levels instead of the inversion path
# (--anchor_points noised): does the wrong way come from the inversion path, or from the rest of the loss?
DIAGNOSTIC = [
    {"name": "inversion_dpo_x0, plain inversion path, rule, 1 stratified loss step per pair (the default before), at forward noisings (diagnostic)",
     "loss": "inversion_dpo_x0", "weighting": "official", "beta": "rule", "lr": 1e-4, "loss_timesteps": 1,
     "sampling": "stratified", "anchor_points": "noised"},
]
# development candidates for the anchored form's default (position and colour only)
CANDIDATES = [
    {"name": "inversion_dpo_x0, default rule (kappa 40), 1 step", "loss": "inversion_dpo_x0", "weighting": "official",
     "beta": "rule", "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 50, 1 step", "loss": "inversion_dpo_x0", "weighting": "official", "beta": 50,
     "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 150, 1 step", "loss": "inversion_dpo_x0", "weighting": "official", "beta": 150,
     "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 500, 1 step", "loss": "inversion_dpo_x0", "weighting": "official", "beta": 500,
     "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "inversion_dpo_x0, beta 50, lr 3e-5, 1 step", "loss": "inversion_dpo_x0", "weighting": "official",
     "beta": 50, "lr": 3e-5, "loss_timesteps": 1, "sampling": "stratified"},
    {"name": "diffusion_dpo, beta 500", "loss": "diffusion_dpo", "weighting": "-", "beta": 500, "lr": 1e-4},
    # the inversion path moved onto the sampler's statistics (--anchor_points standardised), at the rule's kappa and
    # at 5x it (Diffusion-DPO's beta x reference error was 43 to 65 on the toys, the noised diagnostic's beta ~100)
    {"name": "inversion_dpo_x0, standardised points, rule (kappa 40), 1 step", "loss": "inversion_dpo_x0",
     "weighting": "official", "beta": "rule", "lr": 1e-4, "loss_timesteps": 1, "sampling": "stratified",
     "anchor_points": "standardised"},
    {"name": "inversion_dpo_x0, standardised points, rule (kappa 200), 1 step", "loss": "inversion_dpo_x0",
     "weighting": "official", "beta": "rule", "relative_beta": 200, "lr": 1e-4, "loss_timesteps": 1,
     "sampling": "stratified", "anchor_points": "standardised"},
]


class Transfer(Study):
    """The alignment study's machinery (one run = train + measure in subprocesses, resumable) on other properties."""

    def __init__(self, quick, work, tasks):
        super().__init__(quick, work)
        self.tasks = tasks
        if quick:
            self.steps, self.every, self.curve = 2, 1, [1, 2]
        else:
            self.steps, self.every, self.curve = 60, 20, [20, 40, 60]

    def setup(self):
        import toy_task

        build = dict(vae_steps=20, unet_steps=60) if self.quick else {}
        started = time.perf_counter()
        for task in self.tasks:
            toy_task.build_task_model(self.toy, task, progress=lambda it, desc=None: it, **build)
            toy_task.build_pairs(self.toy / f"pairs_{task}", count=self.pairs, seed=1, task=task)
            toy_task.build_pairs(self.toy / f"heldout_{task}", count=self.heldout_pairs, seed=2, task=task)
        self.build_seconds = time.perf_counter() - started
        self.fill_seconds = {task: self.fill_cache(task) for task in self.tasks}

    def wanted_measures(self, spec):
        """The rate on the report sampling seed at each curve step (the last one is the result), and 'final'."""
        return [f"rate:{step}:0:{self.samples}" for step in self.curve] + ["final"]

    def train(self, spec, run_dir):
        if spec["beta"] == "rule":  # the trainer's own default
            spec = {**spec, "beta": None}
        super().train(spec, run_dir)


def summarise(study, records, config, task, base):
    key = f"rate:{study.steps}:0:{study.samples}"
    spec = {k: v for k, v in config.items() if k != "name"}
    specs = [{**spec, "task": task, "seed": seed} for seed in study.seeds]
    effects = [effect_of(records, s, key) for s in specs]
    runs = {d: [records[name_of({**s, "direction": d})] for s in specs] for d in ("for", "against")}
    curve = []
    for step in study.curve:
        values = [effect_of(records, s, f"rate:{step}:0:{study.samples}") for s in specs]
        seconds = [r["metrics"][str(step)]["elapsed_s"] for d in runs for r in runs[d]]
        curve.append({"step": step, "seconds": float(np.mean(seconds)), "effect": interval(values), "effects": values})
    mean, half = interval(effects)
    last = str(study.steps)
    return {
        "property": task, "configuration": config["name"], "effect": 100 * mean,
        "interval": None if np.isnan(half) else 100 * half, "effects": [100 * e for e in effects],
        "for_rate": [100 * r["measures"][key]["rate"] for r in runs["for"]],
        "against_rate": [100 * r["measures"][key]["rate"] for r in runs["against"]],
        "base_rate": 100 * base[task]["rate"],
        "heldout_loss": float(np.mean([r["measures"]["final"]["heldout_loss"] for d in runs for r in runs[d]])),
        "base_heldout_loss": base[task]["heldout_loss"],
        "heldout_implicit_accuracy": float(np.mean([r["measures"]["final"]["heldout_implicit_accuracy"]
                                                    for d in runs for r in runs[d]])),
        "beta_used": [r["metrics"][last].get("beta") for d in runs for r in runs[d]],
        "score_w": float(np.mean([r["metrics"][last].get("score_w", np.nan) for d in runs for r in runs[d]])),
        "score_l": float(np.mean([r["metrics"][last].get("score_l", np.nan) for d in runs for r in runs[d]])),
        "saturated": float(np.mean([r["metrics"][last].get("saturated", 0.0) for d in runs for r in runs[d]])),
        "curve": curve, "spec": spec,
    }


def wrong_way(row):
    """Seeds on which a side moved the wrong way: trained for it below the base rate, or against it above (beyond
    the binomial noise of the rate, 2 standard errors at the base rate)."""
    p, n = row["base_rate"] / 100, 256
    margin = 200 * np.sqrt(p * (1 - p) / n)
    return {"for": sum(r < row["base_rate"] - margin for r in row["for_rate"]),
            "against": sum(r > row["base_rate"] + margin for r in row["against_rate"])}


def write(rows, study, path, title):
    lines = [title, "",
             f"Each run: {study.steps} AdamW steps of {study.batch} pairs, N = 10, guidance 1, constant lr, "
             f"weight decay "
             f"1e-2, fp32, warm float32 trajectory cache. Effect = rate trained for the preference minus trained "
             f"against it (points, {study.samples} samples, sampling seed 0), mean ± 95% t-interval over training "
             f"seeds {study.seeds}. Wrong way: seeds where the run trained for the preference ended below the base "
             f"rate, or the one trained against it above it, by more than 2 binomial standard errors.", ""]
    for task in dict.fromkeys(r["property"] for r in rows):
        lines += [f"**{task}** (base rate {rows[[r['property'] for r in rows].index(task)]['base_rate']:.1f}%, "
                  f"base held-out loss {next(r for r in rows if r['property'] == task)['base_heldout_loss']:.4f})",
                  "", "| configuration | effect | for (%) | against (%) | wrong way (for, against) | held-out loss | "
                  "S_w, S_l at end | saturated at end | beta used |", "|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["property"] == task):
            ways = wrong_way(row)
            half = np.nan if row["interval"] is None else row["interval"] / 100
            betas = sorted({round(b, 1) for b in row["beta_used"] if b is not None})
            lines.append(
                f"| {row['configuration']} | {fmt((row['effect'] / 100, half))} | "
                f"{'/'.join(f'{v:.0f}' for v in row['for_rate'])} | "
                f"{'/'.join(f'{v:.0f}' for v in row['against_rate'])} "
                f"| {ways['for']}, {ways['against']} | {row['heldout_loss']:.4f} | {row['score_w']:.3f}, "
                f"{row['score_l']:.3f} | {row['saturated']:.2f} | "
                f"{', '.join(f'{b:g}' for b in betas) if betas else row['spec']['beta'] or '-'} |")
        lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, path.with_suffix(".png"))
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["property"] for r in rows))
    names = list(dict.fromkeys(r["configuration"] for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in (r for r in rows if r["property"] == task):
            plot_effect(ax, row["curve"], "step", label=row["configuration"],
                        color=f"C{names.index(row['configuration']) % 10}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"{task} (base rate {next(r for r in rows if r['property'] == task)['base_rate']:.0f}%)")
        ax.set_xlabel("optimiser steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("preference effect (points; 95% interval over seeds)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def inversion_statistics(base, manifest):
    """The std and per-channel means of the inversion's end point x_N for a manifest's winners and its losers."""
    import torch

    import toy_task
    from inversion import InversionSchedule, invert
    from why import latents_of

    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()]
    out = {}
    with torch.no_grad():
        cond, uncond = toy_task.caption_conditioning(base, [row["caption"] for row in rows])
        schedule = InversionSchedule.from_scheduler_config(base.scheduler.config, 10)
        for column in ("chosen", "rejected"):
            latents = latents_of(base, Path(manifest).parent, [row[column] for row in rows])
            end = invert(base.unet, latents, cond, uncond, schedule, 1.0).latents[:, -1]
            out[column] = {"std": end.std().item(), "channel_means": end.mean(dim=(0, 2, 3)).tolist()}
        out["gaussian_channel_mean_sd"] = 1 / (end.shape[-1] * end.shape[-2] * len(rows)) ** 0.5
    return out


def explain(study, records, configs, path):
    """Why a form moves one way whichever way it is trained: for training seed 0, trained for and against, the
    per-step decomposition of the anchored forms' score on held-out pairs (benchmarks/why.py) and, for every form,
    the policy-minus-reference denoising error on fresh images of the preferred and the other value at three noise
    levels. Writes `path`.{md,json}."""
    import torch

    import toy_task
    import why

    torch.set_num_threads(2)
    report, lines = {}, ["Training seed 0. Decomposition: per inversion step (noisiest last), mean over held-out "
                         "pairs of w_i (E_i(theta) - E_i(ref)) / N x1000 for winners and losers, S their sum, margin "
                         "-beta/2 (S_w - S_l) and implicit accuracy. Noising: policy minus reference denoising error "
                         "x1000 on 256 fresh images of each value, noised to t = 100, 500, 900.", ""]
    lines += ["Where the inversion ends: the reference's DDIM inversion of the held-out winners and losers (N = 10, "
              "guidance 1) to x_N, against the standard Gaussian that sampling starts from (std 1, channel means 0 "
              "within 1/sqrt(H W)).", "",
              "| property | x_N std, winners | x_N std, losers | channel means of x_N, winners | losers | "
              "a Gaussian's channel-mean sd |", "|---|---|---|---|---|---|"]
    for task in study.tasks:
        stats = inversion_statistics(toy_task.load_pipeline(study.model(task)),
                                     study.toy / f"heldout_{task}" / "pairs.jsonl")
        report[f"{task}/inversion"] = stats
        lines.append(f"| {task} | {stats['chosen']['std']:.3f} | {stats['rejected']['std']:.3f} | "
                     + " | ".join(", ".join(f"{v:+.2f}" for v in stats[c]["channel_means"])
                                  for c in ("chosen", "rejected"))
                     + f" | {stats['gaussian_channel_mean_sd']:.3f} |")
    lines.append("")
    for task in study.tasks:
        base = toy_task.load_pipeline(study.model(task))
        manifest = study.toy / f"heldout_{task}" / "pairs.jsonl"
        values = toy_task.PROPERTIES[task]["values"]
        images = why.fresh_images(task)
        for config in configs:
            spec = {k: v for k, v in config.items() if k != "name"}
            entry = {}
            for direction in ("for", "against"):
                name = name_of({**spec, "task": task, "seed": 0, "direction": direction})
                run, run_dir = records[name], study.work / "runs" / name
                pipe = toy_task.load_pipeline(study.model(task), run_dir)
                entry[direction] = {"noising": why.value_errors(pipe, base.unet, images)}
                if spec["loss"] in why.POINT:
                    beta = run["metrics"][str(study.steps)].get("beta") or spec["beta"]
                    entry[direction].update(why.decompose(base, pipe.unet, {**spec, "beta": beta}, manifest))
            report[f"{task}/{config['name']}"] = entry
            lines += [f"**{task}: {config['name']}**", ""]
            if "winner" in entry["for"]:
                steps = entry["for"]["timesteps"]
                lines += ["| run | term | " + " | ".join(f"t={t}" for t in steps) + " | S | margin, acc. |",
                          "|---|---|" + "---|" * len(steps) + "---|---|"]
                for direction, e in entry.items():
                    for term, key, total in ((f"winner ({values[0]})", "winner", "S_w"),
                                             (f"loser ({values[1]})", "loser", "S_l")):
                        tail = f"{e['margin']:+.2f}, {e['accuracy']:.2f}" if key == "winner" else ""
                        lines.append(f"| {direction} | {term} | " + " | ".join(f"{1000 * v:+.2f}" for v in e[key])
                                     + f" | {1000 * e[total]:+.2f} | {tail} |")
                lines.append("")
            lines += ["| run | " + " | ".join(f"{v} at t={t}" for v in values for t in why.NOISE_LEVELS) + " |",
                      "|---|" + "---|" * (len(values) * len(why.NOISE_LEVELS))]
            for direction, e in entry.items():
                lines.append(f"| {direction} | " + " | ".join(f"{1000 * e['noising'][v][t]:+.2f}" for v in values
                                                              for t in why.NOISE_LEVELS) + " |")
            lines.append("")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (rough toys, 1 seed, 2 steps)")
    parser.add_argument("--dev", action="store_true", help="the development candidates on position and colour")
    parser.add_argument("--work_dir", default="/tmp/inversion-dpo-transfer")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each one CPU thread)")
    args = parser.parse_args()
    started = time.perf_counter()
    tasks = DEVELOPMENT if args.dev else HELD_OUT
    study = Transfer(args.quick, Path(args.work_dir), tasks[:1] if args.quick else tasks)
    study.setup()
    base = measure_base(study)
    configs = CANDIDATES if args.dev else RECOMMENDED + DIAGNOSTIC
    if args.quick:
        configs = configs[:2] + [c for c in configs if c["loss"] == "diffusion_dpo"]
    specs = [{**{k: v for k, v in c.items() if k != "name"}, "task": task, "seed": seed, "curve": True}
             for c in configs for task in study.tasks for seed in study.seeds]
    records = study.run_all(specs, args.workers)
    rows = [summarise(study, records, c, task, base) for task in study.tasks for c in configs]
    suffix = "_quick" if args.quick else "_dev" if args.dev else ""
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    title = (f"Transfer study ({'development properties' if args.dev else 'held-out properties'}), "
             f"{time.perf_counter() - started:.0f} s this invocation (finished runs reused); toy build "
             f"{study.build_seconds:.0f} s, cache fills "
             f"{', '.join(f'{t} {s:.0f} s' for t, s in study.fill_seconds.items())}.")
    print("\n".join(write(rows, study, Path(args.results_dir) / f"transfer{suffix}", title)))
    explained = [c for c in configs if c["loss"] in ("inversion_dpo_x0", "diffusion_dpo")]
    print("\n".join(explain(study, records, explained, Path(args.results_dir) / f"why_transfer{suffix}")))


if __name__ == "__main__":
    main()
