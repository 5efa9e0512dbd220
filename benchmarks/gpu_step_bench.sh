#!/usr/bin/env bash
# The GPU figures of README "Speed and memory" in one run on one CUDA GPU (SDXL-sized UNet, then SD3.5-medium- and
# FLUX.1-dev-sized transformers; random weights, 1024 px, bf16), most important first. Each configuration is
# appended to RESULTS as soon as it ends, so a run cut short keeps what it measured; TIMEOUT bounds each one.
# Then the loss rows: Diffusion-DPO's step against the anchored form's warm-cache step (SDXL size, bf16, full
# fine-tune, the same pair), ROWS=loss runs those alone.
#
#   bash benchmarks/gpu_step_bench.sh [RESULTS]     # default benchmarks/results/step_bench_gpu.jsonl
#   PEAK_TFLOPS=989 TIMEOUT=240 COMPILE_TIMEOUT=400 bash benchmarks/gpu_step_bench.sh out.jsonl
#   ROWS=loss LOSS_TIMEOUT=200 bash benchmarks/gpu_step_bench.sh out.jsonl   # the loss rows alone (minutes)
#   CONFIG=tiny bash benchmarks/gpu_step_bench.sh /tmp/x.jsonl      # the same sequence on the tiny model (a dry run)
set -u
RESULTS=${1:-benchmarks/results/step_bench_gpu.jsonl}
TIMEOUT=${TIMEOUT:-240}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-400}  # inductor compiles the forward and backward graphs first
LOSS_TIMEOUT=${LOSS_TIMEOUT:-$TIMEOUT}  # per process of a loss row (the cache's fill at N = 80 is the longest)
ROWS=${ROWS:-all}  # all: every row; loss: the loss rows only
case "$ROWS" in all|loss) ;; *) echo "ROWS must be all or loss, not $ROWS" >&2; exit 2;; esac
PEAK_TFLOPS=${PEAK_TFLOPS:-989}  # dense bf16 peak of an H100 SXM (and H200)
CONFIG=${CONFIG:-sdxl}
if [ "$CONFIG" = tiny ]; then SD3_CONFIG=tiny_sd3; FLUX_CONFIG=tiny_flux; else SD3_CONFIG=sd3; FLUX_CONFIG=flux; fi
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$RESULTS")"
bench() {
    "${PYTHON:-python3}" benchmarks/step_bench.py --config "$CONFIG" --steps 1 --timeout "$TIMEOUT" --peak_tflops "$PEAK_TFLOPS" \
        --json "$RESULTS" "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
if [ "$ROWS" = all ]; then
# (b) full fine-tune without a cache at N = 80: does it fit, and its MFU
bench --modes uncached --inversion_steps 80
# LoRA with a warm cache at N = 80: peak memory against a 24 GB card
bench --modes cached --inversion_steps 80 --lora
# (c) full fine-tune with a warm cache: the policy passes alone, their MFU
bench --modes cached --inversion_steps 80
# (a) the released schedule: the largest N that fits
bench --modes released --inversion_steps 80 40 20 10 --stop_when_fits
# torch.compile (inductor) against the same configuration without it
bench --modes cached --inversion_steps 10
bench --modes cached --inversion_steps 10 --compile --timeout "$COMPILE_TIMEOUT"
# SD3.5-medium- and FLUX.1-dev-sized transformers at 1024 px, N = 28 (their pipelines' default sampling steps):
# LoRA with a warm cache and without; SD3 full fine-tune (FLUX's 12B full fine-tune needs FSDP)
bench --config "$SD3_CONFIG" --modes cached uncached --inversion_steps 28 --lora
bench --config "$SD3_CONFIG" --modes cached uncached --inversion_steps 28
bench --config "$FLUX_CONFIG" --modes cached uncached --inversion_steps 28 --lora
fi
# The loss rows, at SDXL size, bf16, full fine-tune, one pair (rows record loss_type, loss_timesteps,
# loss_timestep_sampling, loss_guidance_scale): Diffusion-DPO's step (policy and frozen reference at one noise level);
# the anchored form with a warm cache at N = 80, inversion guidance 2, (a) every step, loss guidance 2, K = 1;
# (b) loss guidance 1 at M = 4 stratified steps, one graph (K = M, as benchmarks/step_cost.py's table); (c) the same
# at M = 1. The M-step steps take seconds: three timed steps each (median); each cached row fills its cache first.
loss_bench() { bench --timeout "$LOSS_TIMEOUT" "$@"; }
loss_bench --loss_type diffusion_dpo --steps 3
loss_bench --loss_type inversion_dpo_x0 --modes cached --inversion_steps 80
loss_bench --loss_type inversion_dpo_x0 --modes cached --inversion_steps 80 --loss_guidance_scale 1 \
    --loss_timesteps 4 --loss_timestep_sampling stratified --chunk 4 --steps 3
loss_bench --loss_type inversion_dpo_x0 --modes cached --inversion_steps 80 --loss_guidance_scale 1 \
    --loss_timesteps 1 --loss_timestep_sampling stratified --steps 3
echo "results in $RESULTS"
