#!/usr/bin/env bash
# Inversion-DPO on SDXL with the released recipe, the loss anchored and evaluated at 8 of the 80 inversion steps
# (LOSS_TIMESTEPS below). Run it on a GPU node from the repository root.
#
# Change any value through its environment variable, or append flags (they come last, so they win):
#   DATASET_NAME=/data/pickapic_v2 OUTPUT_DIR=runs/paper bash sdxl.sh --loss_type inversion_dpo
# The loss is the trainer's default, the anchored form (inversion_dpo_x0): the inversion form whose preference effect
# held on every seed of the colour toy (docs/study.md, "Choosing a loss"), at its default points (the inversion path
# standardised per channel) never the wrong way on the six toy properties and the flow toy, but below
# --loss_type diffusion_dpo on each of them (README, "Choosing a loss"). The released run's loss:
#   LOSS_TIMESTEPS= bash sdxl.sh --loss_type inversion_dpo_official --inversion_steps_offset 0   (paper sign: inversion_dpo)
# LEARNING_RATE is the released one; beta follows the reference's error scale (BETA_DPO below).
# The released launcher's flags (--sdxl, --variant, --cache_dir, --cache_dir_model, --dataloader_num_workers) are
# accepted, so a released command line works with only the script name changed. Set VAE= or VARIANT= (empty) to
# leave those flags out. Several GPUs: put accelerate's flags in ACCELERATE_ARGS, e.g. "--multi_gpu --num_processes 8".
set -euo pipefail
cd "$(dirname "$0")"

MODEL_NAME="${MODEL_NAME-stabilityai/stable-diffusion-xl-base-1.0}"
VAE="${VAE-madebyollin/sdxl-vae-fp16-fix}"
VARIANT="${VARIANT-fp16}"
# Reported unavailable on the hub since 2025: see docs/data.md, "Preference data", for mirrors and local copies.
DATASET_NAME="${DATASET_NAME-yuvalkirstain/pickapic_v2}"
OUTPUT_DIR="${OUTPUT_DIR-tmp-sdxl}"
# Rerunning the recipe resumes the run in OUTPUT_DIR from its newest intact checkpoint (a preempted job restarts
# where it stopped; a changed setting that defines the run stops it, naming the change). A new run: another
# OUTPUT_DIR, or RESUME= (empty) with --overwrite_output_dir.
RESUME="${RESUME-latest}"
MIXED_PRECISION="${MIXED_PRECISION-bf16}"
RESOLUTION="${RESOLUTION-1024}"
NUM_INFERENCE_STEPS="${NUM_INFERENCE_STEPS-80}"
# The policy at one step per block of about 10 inversion steps, drawn stratified (docs/speed_and_memory.md, "What a step costs": on both
# toys one such step per pair reached Diffusion-DPO's effect in under half its time, every seed); LOSS_TIMESTEPS=
# (empty) evaluates every step, as released.
LOSS_TIMESTEPS="${LOSS_TIMESTEPS-$(( (NUM_INFERENCE_STEPS + 9) / 10 ))}"
# Empty: the anchored form's rule, beta = 40 / R with R the reference's own error on the first batch (docs/study.md,
# "Settings that transfer"); a number sets beta (the released recipe's is 2000; other --loss_type values default to it).
BETA_DPO="${BETA_DPO-}"
LEARNING_RATE="${LEARNING_RATE-1e-8}"
LR_WARMUP_STEPS="${LR_WARMUP_STEPS-1000}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS-2000}"
CHECKPOINTING_STEPS="${CHECKPOINTING_STEPS-200}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE-1}"
GRADIENT_ACCUMULATION_STEPS="${GRADIENT_ACCUMULATION_STEPS-1}"
DATALOADER_NUM_WORKERS="${DATALOADER_NUM_WORKERS-0}"
ACCELERATE_ARGS="${ACCELERATE_ARGS-}"

# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
accelerate launch --mixed_precision "$MIXED_PRECISION" $ACCELERATE_ARGS train_inversion_dpo.py \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  ${VAE:+--pretrained_vae_model_name_or_path "$VAE"} \
  ${VARIANT:+--variant "$VARIANT"} \
  --dataset_name "$DATASET_NAME" \
  --output_dir "$OUTPUT_DIR" \
  ${RESUME:+--resume_from_checkpoint "$RESUME"} \
  --mixed_precision "$MIXED_PRECISION" \
  --resolution "$RESOLUTION" \
  --num_inference_steps "$NUM_INFERENCE_STEPS" \
  ${LOSS_TIMESTEPS:+--loss_timesteps "$LOSS_TIMESTEPS"} \
  --inversion_guidance_scale 2 \
  ${BETA_DPO:+--beta_dpo "$BETA_DPO"} \
  --learning_rate "$LEARNING_RATE" --scale_lr \
  --lr_scheduler constant_with_warmup --lr_warmup_steps "$LR_WARMUP_STEPS" \
  --max_train_steps "$MAX_TRAIN_STEPS" \
  --checkpointing_steps "$CHECKPOINTING_STEPS" \
  --train_batch_size "$TRAIN_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
  --dataloader_num_workers "$DATALOADER_NUM_WORKERS" \
  --gradient_checkpointing \
  --use_adafactor \
  --sdxl \
  "$@"
