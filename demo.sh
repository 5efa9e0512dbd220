#!/usr/bin/env bash
# Inversion-DPO end to end on a CPU in a few minutes, nothing downloaded.
#
# 1. builds (once, reused afterwards) a toy text-to-image model: the tiny SDXL-shaped pipeline with its VAE and UNet
#    trained here on 32x32 images of a red or a blue square (TOY_VAE_STEPS, default 120, and TOY_UNET_STEPS, default
#    350: a shorter build than the alignment study's 200 and 700, to stay within 3 minutes on 2 CPU cores), and 512
#    preference pairs ranking red above blue;
# 2. trains it with train_inversion_dpo.py through accelerate, the code path of SDXL (VAE encoding, both text
#    encoders, DDIM inversion by the reference, checkpoints) with the loss and settings that the alignment study
#    (benchmarks/alignment.py, docs/study.md, "Choosing a loss") recommends: the anchored form, official weights, the policy
#    at one stratified-drawn step of the 10 per pair (benchmarks/efficiency.py, docs/speed_and_memory.md, "What a step costs"), beta
#    from the trainer's rule (40 / the reference's error on the first batch; docs/study.md, "Settings that transfer");
# 3. samples the base and the tuned model from the same seeds and prints the fraction of red squares.
#
# DEMO_DIR chooses where everything goes (default demo_output/); extra arguments go to the trainer.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

DEMO_DIR="${DEMO_DIR:-demo_output}"
if ! mkdir -p "$DEMO_DIR" 2>/dev/null || ! touch "$DEMO_DIR/.writable" 2>/dev/null; then
  echo "error: cannot write to $DEMO_DIR; set DEMO_DIR to a writable folder" >&2
  exit 1
fi
rm -f "$DEMO_DIR/.writable"

echo "== 1/3 toy model and preference pairs (built once, then reused)"
python toy_task.py build "$DEMO_DIR" --vae_steps "${TOY_VAE_STEPS:-120}" --unet_steps "${TOY_UNET_STEPS:-350}"

echo "== 2/3 Inversion-DPO training (anchored form, 10 inversion steps, 1 loss step per pair, 40 optimiser steps of 8 pairs)"
rm -rf "$DEMO_DIR/run"
python -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no train_inversion_dpo.py \
  --pretrained_model_name_or_path "$DEMO_DIR/model" \
  --dataset_name "$DEMO_DIR/pairs/pairs.jsonl" \
  --output_dir "$DEMO_DIR/run" \
  --resolution 32 --no_hflip \
  --loss_type inversion_dpo_x0 --num_inference_steps 10 --inversion_guidance_scale 1 --loss_timesteps 1 \
  --learning_rate 1e-4 --lr_scheduler constant \
  --train_batch_size 8 --max_train_steps 40 --checkpointing_steps 20 \
  --report_to none --seed 0 "$@"

echo "== 3/3 sampling the base and the tuned model from the same seeds"
python toy_task.py evaluate "$DEMO_DIR" "$DEMO_DIR/run"
echo "Everything is in $DEMO_DIR/: model/ (toy base model), pairs/ (preference data), run/ (training output:"
echo "unet/, checkpoint-*/, metrics.jsonl, before_after.png, preference_rate.json)."
