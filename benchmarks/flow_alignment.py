"""Does Inversion-DPO align a rectified-flow model? The alignment study's causal check on an SD3-shaped toy.

The toy task of `toy_task.py` (red or blue squares; red preferred for "a square") with the tiny SD3-shaped pipeline
(two CLIP encoders, T5, a joint-attention transformer, 16-channel VAE, shifted flow scheduler) trained here by flow
matching. Each configuration is trained for the preference and against it (pairs swapped), same seeds; its preference
effect is (red rate trained for red) - (red rate trained for blue), METHOD.md section 6. The recommended form
(inversion_dpo_x0, official SNR-matched weights, warm float32 trajectory cache) and diffusion_dpo (the model's
logit-normal noise levels) each get beta from a grid (learning rate 1e-4, as both chose on the SDXL toy; a best beta
on the grid's edge extends it one step), chosen on sampling seed 1 at training seed 0 (ties within 2 points: lower
held-out loss), then trained on seeds 0, 1, 2 and
reported on sampling seed 0 with 95% t-intervals, against optimiser steps and training seconds.

    python benchmarks/flow_alignment.py --work_dir /tmp/flowstudy     # the study (resumable: finished runs reused)
    python benchmarks/flow_alignment.py --quick --work_dir DIR        # smoke run of every stage

Writes benchmarks/results/flow_alignment.{md,json,png} (flow_alignment_quick.* for --quick).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

import toy_task  # noqa: E402
from alignment import RESULTS, fmt, interval, measured_here, plot_effect, run_trainer  # noqa: E402

GRID = {"inversion_dpo_x0": (5.0, 50.0, 500.0), "diffusion_dpo": (50.0, 500.0, 5000.0)}
RULE = "inversion_dpo_x0_rule"  # the anchored form at the trainer's default beta rule (--relative_beta), untuned
# the same at the inversion path standardised per channel (--anchor_points standardised), untuned
STANDARDISED = "inversion_dpo_x0_standardised"
LEARNING_RATE = 1e-4
VALIDATION_SEED, REPORT_SEED = 1, 0


class FlowStudy:
    def __init__(self, work, quick):
        self.work, self.quick = Path(work), quick
        self.toy = self.work / "toy"
        self.steps, self.every = (4, 2) if quick else (40, 10)
        self.samples = 32 if quick else 256
        self.seeds = (0,) if quick else (0, 1, 2)
        self.grid = {form: betas[1:2] if quick else betas for form, betas in GRID.items()}

    def setup(self):
        started = time.perf_counter()
        build = dict(vae_steps=20, unet_steps=30) if self.quick else {}
        toy_task.build_model(self.toy / "model", kind="sd3", progress=lambda it, desc=None: it, **build)
        toy_task.build_pairs(self.toy / "pairs", count=64 if self.quick else 512, seed=1)
        build_seconds = time.perf_counter() - started
        marker = self.work / "cache_filled.json"
        if not marker.is_file():
            started = time.perf_counter()
            self.trainer(["--dataset_name", str(self.toy / "pairs" / "pairs.jsonl"), "--loss_type", "inversion_dpo_x0",
                          "--inversion_cache_dir", str(self.work / "cache"), "--inversion_cache_dtype", "float32",
                          "--fill_inversion_cache", "--output_dir", str(self.work / "fill")], threads=None,
                         cold=not self.quick)
            marker.write_text(json.dumps({"seconds": time.perf_counter() - started}))
        return build_seconds, json.loads(marker.read_text())["seconds"]

    def trainer(self, flags, threads=1, cold=False):
        run_trainer(self.toy / "model", ["--max_sequence_length", str(toy_task.MAX_TOKENS), "--train_batch_size", "8",
                                         "--adam_weight_decay", "0", *flags], threads, cold)

    def run(self, spec):
        """Train one run unless it finished before, measure it in a one-thread subprocess; returns its record."""
        run_dir = self.work / "runs" / name_of(spec)
        record_path = run_dir / "record.json"
        if record_path.is_file():
            return json.loads(record_path.read_text())
        if not (run_dir / "transformer").is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
            manifest = "pairs.jsonl" if spec["direction"] == "for" else "pairs_swapped.jsonl"
            flags = ["--dataset_name", str(self.toy / "pairs" / manifest), "--output_dir", str(run_dir),
                     "--loss_type", spec["loss"], "--learning_rate",
                     str(LEARNING_RATE), "--seed", str(spec["seed"]), "--max_train_steps", str(self.steps),
                     "--checkpointing_steps", str(self.every)]
            if spec["beta"] is not None:  # None: the trainer's default (the anchored form's relative rule)
                flags += ["--beta_dpo", str(spec["beta"])]
            if spec["loss"] != "diffusion_dpo":
                flags += ["--inversion_cache_dir", str(self.work / "cache"), "--inversion_cache_dtype", "float32"]
            if spec.get("anchor_points"):
                flags += ["--anchor_points", spec["anchor_points"]]
            self.trainer(flags)
        if self.quick:  # in this process (alignment.measured_here)
            measures = measured_here(lambda: print(json.dumps(measure(str(run_dir), self.samples, self.work))))
        else:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, __file__, "--measure", str(run_dir), "--samples",
                                     str(self.samples), "--work_dir", str(self.work)], cwd=ROOT, capture_output=True,
                                    text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"measuring {run_dir} failed:\n{result.stderr[-3000:]}")
            measures = json.loads(result.stdout.strip().splitlines()[-1])
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        record = {"spec": spec, "seconds": {str(m["step"]): m["elapsed_s"] for m in metrics},
                  "beta_used": metrics[-1].get("beta"), "final_loss": metrics[-1]["loss"], **measures}
        record_path.write_text(json.dumps(record))
        return record

    def run_all(self, specs, workers):
        runs = [{**spec, "direction": d} for spec in specs for d in ("for", "against")]
        with ThreadPoolExecutor(workers) as pool:
            return {name_of(r): rec for r, rec in zip(runs, pool.map(self.run, runs))}


def name_of(spec):
    beta = "rule" if spec["beta"] is None else f"{spec['beta']:g}"
    points = f"-{spec['anchor_points']}" if spec.get("anchor_points") else ""
    return f"{spec['loss']}-b{beta}{points}-s{spec['seed']}-{spec['direction']}"


def measure(run_dir, samples, work):
    """Red rates of every checkpoint and the final model (sampling seed REPORT_SEED; the final one also on
    VALIDATION_SEED), and the final model's held-out denoising loss."""
    import torch

    torch.set_num_threads(1)
    toy = Path(work) / "toy" / "model"
    out = {"rates": {}}
    folders = {int(p.name.split("-")[1]): p for p in Path(run_dir).glob("checkpoint-*")}
    for step, folder in sorted(folders.items()):
        pipe = toy_task.load_pipeline(toy, folder)
        out["rates"][str(step)] = toy_task.preference_rate(pipe, samples, seed=REPORT_SEED)
        if step == max(folders):
            out["validation_rate"] = toy_task.preference_rate(pipe, samples, seed=VALIDATION_SEED)
            out["heldout_loss"] = toy_task.heldout_denoising_loss(pipe)
    return out


def effect(records, spec, get):
    rates = {d: get(records[name_of({**spec, "direction": d})]) for d in ("for", "against")}
    return rates["for"] - rates["against"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="toy model, cache and runs (reused when run again)")
    parser.add_argument("--quick", action="store_true", help="smoke run: rough toy, one seed, a few steps")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each one CPU thread)")
    parser.add_argument("--results_dir", default=str(RESULTS))
    parser.add_argument("--forms", nargs="+", choices=[*GRID, RULE, STANDARDISED], default=None,
                        help="run these rows only (written to flow_alignment_FORMS.*)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.samples, args.work_dir)))
        return
    started = time.perf_counter()
    study = FlowStudy(args.work_dir, args.quick)
    build_seconds, fill_seconds = study.setup()
    base_pipe = toy_task.load_pipeline(study.toy / "model")
    base = {"rate": toy_task.preference_rate(base_pipe, study.samples, seed=REPORT_SEED),
            "heldout_loss": toy_task.heldout_denoising_loss(base_pipe)}
    chosen, rows = {}, {}
    forms = {**study.grid, RULE: None}
    if args.forms and STANDARDISED in args.forms:  # a candidate, run only when asked for
        forms[STANDARDISED] = None
    for form, betas in ((f, b) for f, b in forms.items() if args.forms is None or f in args.forms):
        if betas is None:  # the anchored form's default rule: no grid, nothing chosen
            chosen[form], scored = {"loss": "inversion_dpo_x0", "beta": None, "seed": 0}, []
            if form == STANDARDISED:
                chosen[form]["anchor_points"] = "standardised"
            records = {}
        else:
            betas, extended = list(betas), set()
        # a best beta on an edge of the grid extends it by one step on that side (once per side)
        while betas is not None:
            grid = [{"loss": form, "beta": beta, "seed": 0} for beta in betas]
            records = study.run_all(grid, args.workers)
            scored = [(effect(records, spec, lambda r: r["validation_rate"]),
                       records[name_of({**spec, "direction": "for"})]["heldout_loss"], spec) for spec in grid]
            best = max(score for score, _, _ in scored)
            candidates = [(loss, spec) for score, loss, spec in scored if score >= best - 0.02]
            chosen[form] = min(candidates, key=lambda c: c[0])[1]
            side = {betas[0]: "low", betas[-1]: "high"}.get(chosen[form]["beta"]) if len(betas) > 1 else None
            if side is None or side in extended:
                break
            extended.add(side)
            betas = [betas[0] / 10] + betas if side == "low" else betas + [betas[-1] * 10]
        specs = [{**chosen[form], "seed": seed} for seed in study.seeds]
        records.update(study.run_all(specs, args.workers))
        steps = sorted(int(s) for s in records[name_of({**specs[0], "direction": "for"})]["rates"])
        curve = []
        for step in steps:
            effects = [effect(records, spec, lambda r, s=step: r["rates"][str(s)]) for spec in specs]
            seconds = np.mean([records[name_of({**spec, "direction": d})]["seconds"][str(step)]
                               for spec in specs for d in ("for", "against")])
            curve.append({"step": step, "seconds": float(seconds), "effect": interval(effects)})
        final = [effect(records, spec, lambda r, s=steps[-1]: r["rates"][str(s)]) for spec in specs]
        rows[form] = {
            "beta": chosen[form]["beta"], "lr": LEARNING_RATE, "effect": interval(final), "per_seed": final,
            "beta_used": sorted({records[name_of({**spec, "direction": d})].get("beta_used") or 0.0
                                 for spec in specs for d in ("for", "against")}),
            "grid": {f"{spec['beta']:g}": score for score, _, spec in scored},
            "rates": {d: [records[name_of({**spec, "direction": d})]["rates"][str(steps[-1])] for spec in specs]
                      for d in ("for", "against")},
            "heldout_loss": float(np.mean([records[name_of({**spec, "direction": "for"})]["heldout_loss"]
                                           for spec in specs])),
            "curve": curve,
        }
    summary = {"base": base, "forms": rows, "seeds": list(study.seeds), "steps": study.steps,
               "samples": study.samples, "toy_build_seconds": build_seconds, "cache_fill_seconds": fill_seconds,
               "total_seconds": time.perf_counter() - started}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "flow_alignment_quick" if args.quick else "flow_alignment"  # a smoke run never replaces the study's files
    if args.forms:  # a part of the study never replaces the whole study's files
        name += "_" + "_".join(args.forms)
    (results / f"{name}.json").write_text(json.dumps(summary, indent=1))
    write_markdown(summary, results / f"{name}.md")
    plot(rows, results / f"{name}.png")
    print((results / f"{name}.md").read_text())


def write_markdown(summary, path):
    base = summary["base"]
    lines = [f"SD3-shaped flow toy, colour task. Base model: {base['rate']:.1%} red, held-out velocity loss "
             f"{base['heldout_loss']:.3f}. {summary['steps']} steps of 8 pairs, N = 10, guidance 1, lr 1e-4; "
             f"training seeds {summary['seeds']}, {summary['samples']} samples per rate (sampling seed 0).", "",
             "| form | beta (grid: effect on validation seed) | effect, points (95% interval) | per seed | red rate "
             "trained for / against | held-out loss | seconds for all steps |",
             "|---|---|---|---|---|---|---|"]
    for form, row in summary["forms"].items():
        grid = ", ".join(f"{beta}: {100 * score:+.0f}" for beta, score in row["grid"].items()) or \
            "rule, untuned: " + ", ".join(f"{b:.3g}" for b in row.get("beta_used", []))
        rates = " / ".join(", ".join(f"{100 * r:.0f}%" for r in row["rates"][d]) for d in ("for", "against"))
        lines.append(f"| {form} | {'-' if row['beta'] is None else format(row['beta'], 'g')} ({grid}) | {fmt(row['effect'])} | "
                     f"{', '.join(f'{100 * e:+.0f}' for e in row['per_seed'])} | {rates} | {row['heldout_loss']:.3f} | "
                     f"{row['curve'][-1]['seconds']:.1f} |")
    build = (f"Toy build {summary['toy_build_seconds']:.0f} s" if summary["toy_build_seconds"] >= 1
             else "Toy model built by an earlier invocation")
    lines += ["", f"{build}, trajectory cache fill "
              f"{summary['cache_fill_seconds']:.0f} s (apart from the runs' seconds), whole study "
              f"{summary['total_seconds'] / 60:.0f} min.", ""]
    path.write_text("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key in zip(axes, ("step", "seconds")):
        for form, row in rows.items():
            plot_effect(ax, row["curve"], key, label=f"{form} (beta {row['beta'] or 'rule'})")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("optimiser steps" if key == "step" else "training seconds (warm trajectory cache)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("preference effect (points; 95% interval over seeds)")
    axes[0].set_title("SD3-shaped flow toy, colour task")
    axes[0].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
