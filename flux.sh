#!/usr/bin/env bash
# Inversion-DPO on FLUX.1-dev (rectified flow, guidance-distilled), LoRA. Run it on a GPU node from the repository
# root.
#
# No released recipe exists for this model; every default below is explained in docs/flow_models.md, "SD3 and FLUX".
# Change any value through its environment variable, or append flags (they come last, so they win):
#   DATASET_NAME=/data/pickapic_v2 OUTPUT_DIR=runs/flux bash flux.sh --max_train_steps 500
# FLUX.1-dev has no unconditional branch: INVERSION_GUIDANCE_SCALE is the value of its guidance embedding, one call
# per step. A full fine-tune of its 12B transformer needs FSDP (docs/scaling.md, "Scaling to several GPUs and machines").
# Several GPUs: put accelerate's flags in ACCELERATE_ARGS, e.g. "--multi_gpu --num_processes 8".
set -euo pipefail
cd "$(dirname "$0")"

MODEL_NAME="${MODEL_NAME-black-forest-labs/FLUX.1-dev}"
# Reported unavailable on the hub since 2025: see docs/data.md, "Preference data", for mirrors and local copies.
DATASET_NAME="${DATASET_NAME-yuvalkirstain/pickapic_v2}"
OUTPUT_DIR="${OUTPUT_DIR-tmp-flux}"
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
INVERSION_GUIDANCE_SCALE="${INVERSION_GUIDANCE_SCALE-3.5}"
MAX_SEQUENCE_LENGTH="${MAX_SEQUENCE_LENGTH-512}"
# Empty: the anchored form's rule, beta = 40 / R with R the reference's own error on the first batch (docs/study.md,
# "Settings that transfer"); a number sets beta (the released recipe's is 2000; other --loss_type values default to it).
BETA_DPO="${BETA_DPO-}"
RANK="${RANK-8}"
LEARNING_RATE="${LEARNING_RATE-1e-5}"
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
  --loss_type inversion_dpo_x0 \
  ${BETA_DPO:+--beta_dpo "$BETA_DPO"} \
  --use_lora --rank "$RANK" \
  --learning_rate "$LEARNING_RATE" \
  --lr_scheduler constant_with_warmup --lr_warmup_steps "$LR_WARMUP_STEPS" \
  --max_train_steps "$MAX_TRAIN_STEPS" \
  --checkpointing_steps "$CHECKPOINTING_STEPS" \
  --train_batch_size "$TRAIN_BATCH_SIZE" \
  --gradient_accumulation_steps "$GRADIENT_ACCUMULATION_STEPS" \
  --dataloader_num_workers "$DATALOADER_NUM_WORKERS" \
  --gradient_checkpointing \
  "$@"
