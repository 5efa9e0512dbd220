#!/usr/bin/env bash
# The GPU figures of README "Speed and memory" in one run on one CUDA GPU (SDXL-sized UNet, then SD3.5-medium- and
# FLUX.1-dev-sized transformers; random weights, 1024 px, bf16), most important first. Each configuration is
# appended to RESULTS as soon as it ends, so a run cut short keeps what it measured; TIMEOUT bounds each one.
#
#   bash benchmarks/gpu_step_bench.sh [RESULTS]     # default benchmarks/results/step_bench_gpu.jsonl
#   PEAK_TFLOPS=989 TIMEOUT=240 COMPILE_TIMEOUT=400 bash benchmarks/gpu_step_bench.sh out.jsonl
#   CONFIG=tiny bash benchmarks/gpu_step_bench.sh /tmp/x.jsonl      # the same sequence on the tiny model (a dry run)
set -u
RESULTS=${1:-benchmarks/results/step_bench_gpu.jsonl}
TIMEOUT=${TIMEOUT:-240}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-400}  # inductor compiles the forward and backward graphs first
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
echo "results in $RESULTS"
