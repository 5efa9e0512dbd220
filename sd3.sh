#!/usr/bin/env bash
# Inversion-DPO on SD3 / SD3.5 (rectified flow). Run it on a GPU node from the repository root.
#
# No released recipe exists for these models; every default below is explained in docs/flow_models.md, "SD3 and FLUX".
# Change any value through its environment variable, or append flags (they come last, so they win):
#   DATASET_NAME=/data/pickapic_v2 OUTPUT_DIR=runs/sd3 bash sd3.sh --max_train_steps 500
# LoRA by default (USE_LORA=1); USE_LORA= (empty) fine-tunes the whole transformer with the SDXL recipe's optimiser
# (Adafactor, learning rate 1e-8 scaled by the global batch). NO_T5=1 drops the T5 encoder, as diffusers allows.
# Several GPUs: put accelerate's flags in ACCELERATE_ARGS, e.g. "--multi_gpu --num_processes 8".
set -euo pipefail
cd "$(dirname "$0")"

MODEL_NAME="${MODEL_NAME-stabilityai/stable-diffusion-3.5-medium}"
# Reported unavailable on the hub since 2025: see docs/data.md, "Preference data", for mirrors and local copies.
DATASET_NAME="${DATASET_NAME-yuvalkirstain/pickapic_v2}"
OUTPUT_DIR="${OUTPUT_DIR-tmp-sd3}"
# Rerunning the recipe resumes the run in OUTPUT_DIR from its newest intact checkpoint (a preempted job restarts
# where it stopped; a changed setting that defines the run stops it, naming the change). A new run: another
# OUTPUT_DIR, or RESUME= (empty) with --overwrite_output_dir.
RESUME="${RESUME-latest}"
MIXED_PRECISION="${MIXED_PRECISION-bf16}"
RESOLUTION="${RESOLUTION-1024}"
NUM_INFERENCE_STEPS="${NUM_INFERENCE_STEPS-28}"
# The policy at one step per block of about 10 inversion steps, drawn stratified (docs/speed_and_memory.md, "What a step costs": on both
# toys one such step per pair reached Diffusion-DPO's effect in under half its time, every seed); LOSS_TIMESTEPS=
# (empty) evaluates every step, as released.
LOSS_TIMESTEPS="${LOSS_TIMESTEPS-$(( (NUM_INFERENCE_STEPS + 9) / 10 ))}"
INVERSION_GUIDANCE_SCALE="${INVERSION_GUIDANCE_SCALE-2}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH-256}"
NO_T5="${NO_T5-}"
# Empty: the anchored form's rule, beta = 40 / R with R the reference's own error on the first batch (docs/study.md,
# "Settings that transfer"); a number sets beta (the released recipe's is 2000; other --loss_type values default to it).
BETA_DPO="${BETA_DPO-}"
USE_LORA="${USE_LORA-1}"
RANK="${RANK-8}"
if [ -n "$USE_LORA" ]; then
  LEARNING_RATE="${LEARNING_RATE-1e-5}"
  OPTIMISER=(--use_lora --rank "$RANK")
else
  LEARNING_RATE="${LEARNING_RATE-1e-8}"
  OPTIMISER=(--use_adafactor --scale_lr)
fi
LR_WARMUP_STEPS="${LR_WARMUP_STEPS-0}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS-2000}"
CHECKPOINTING_STEPS="${CHECKPOINTING_STEPS-200}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE-1}"
GRADIENT_ACCUMULATION_STEPS="${GRADIENT_ACCUMULATION_STEPS-16}"
DATALOADER_NUM_WORKERS="${DATALOADER_NUM_WORKERS-4}"
ACCELERATE_ARGS="${ACCELERATE_ARGS-}"

# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of flags
accelerate launch --mixed_precision "$MIXED_PRECISION" $ACCELERATE_ARGS train_inversion_dpo.py \
  --pretrained_model_name_or_path "$MODEL_NAME" \
  --dataset_name "$DATASET_NAME" \
  --output_dir "$OUTPUT_DIR" \
  ${RESUME:+--resume_from_checkpoint "$RESUME"} \
  --mixed_precision "$MIXED_PRECISION" \
  --resolution "$RESOLUTION" \
  --num_inference_steps "$NUM_INFERENCE_STEPS" \
  ${LOSS_TIMESTEPS:+--loss_timesteps "$LOSS_TIMESTEPS"} \
  --inversion_guidance_scale "$INVERSION_GUIDANCE_SCALE" \
  --max_sequence_length "$MAX_SEQUENCE_LENGTH" \
  ${NO_T5:+--no_t5} \
  --loss_type inversion_dpo_x0 \
  ${BETA_DPO:+--beta_dpo "$BETA_DPO"} \
  "${OPTIMISER[@]}" \
  --learning_rate "$LEARNING_RATE" \
  --lr_scheduler constant_with_warmup --lr_warmup_steps "$LR_WARMUP_STEPS" \
  --max_train_steps "$MAX_TRAIN_STEPS" \
  --checkpointing_steps "$CHECKPOINTING_STEPS" \
  --train_batch_size "$TRAIN_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
  --dataloader_num_workers "$DATALOADER_NUM_WORKERS" \
  --gradient_checkpointing \
  "$@"
