"""The command line of train_inversion_dpo.py: its flags in groups (docs/flags.md is generated from them:
python docs/make_flags.py) and the checks that stop a bad configuration before any model loads. Its own module so
that the benchmarks can parse a configuration exactly as the trainer does without importing the script."""

import argparse

import losses
import runs
from models import _installed
from training import DEFAULT_BETA, NOISING_FORMS, PAPER_FORMS, RELATIVE_BETA

USAGE = """Inversion-DPO training for SDXL, SD1.x/2.x, SD3/SD3.5 and FLUX.1.

    accelerate launch train_inversion_dpo.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --dataset_name PATH_OR_HUB_ID --output_dir out [...]

The recipes sdxl.sh, sd3.sh and flux.sh hold the tested settings; every flag is also in docs/flags.md."""


def build_parser():
    """The command line, in groups (docs/flags.md is generated from it: python docs/make_flags.py)."""
    parser = argparse.ArgumentParser(prog="train_inversion_dpo.py", description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder.")
    model.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix). It runs in the mixed-precision "
                            "dtype; the model's own VAE runs in fp32.")
    model.add_argument("--revision", default=None, help="Hub revision of the model.")
    model.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument("--cache_dir_model", default=None, help="Hub cache for model files (default: --cache_dir).")
    model.add_argument("--sdxl", action="store_true",
                       help="Accepted for the released launcher; SDXL is detected from the model itself.")
    model.add_argument("--max_sequence_length", type=int, default=None,
                       help="SD3 and FLUX: T5 tokens per caption (default: the pipeline's, 256 for SD3, 512 for "
                            "FLUX).")
    model.add_argument("--no_t5", action="store_true",
                       help="SD3: run without the T5 encoder (zeros in its place, as StableDiffusion3Pipeline with "
                            "text_encoder_3=None): about 9 GB less memory. A model saved without T5 runs so anyway.")
    model.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the full model.")
    model.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8).")
    model.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    model.add_argument("--lora_target_modules", default=None,
                       help="Comma-separated module names (default: UNets to_k,to_q,to_v,to_out.0; SD3 and FLUX "
                            "also add_k_proj,add_q_proj,add_v_proj,to_add_out, the text stream of the joint blocks).")

    data = parser.add_argument_group("data (see data.py)")
    data.add_argument("--dataset_name", default=None, help="Hub id, or a local file or folder of preference pairs.")
    data.add_argument("--train_data_dir", default=None, help="Local folder of preference pairs.")
    data.add_argument("--dataset_config_name", default=None, help="Configuration (subset) of a hub dataset.")
    data.add_argument("--dataset_split", "--split", dest="dataset_split", default="train", help="Split to train on.")
    data.add_argument("--cache_dir", default=None, help="Cache for downloaded datasets (and models, unless "
                                                        "--cache_dir_model is given).")
    data.add_argument("--streaming", action="store_true", help="Stream a hub dataset instead of downloading it "
                                                               "(needs --max_train_steps).")
    for column in ("caption", "image_0", "image_1", "label", "winner", "loser"):
        data.add_argument(f"--{column}_column", default=None, help=f"Override the detected {column} column.")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on a seeded random subset of this many pairs.")
    data.add_argument("--resolution", type=int, default=1024, help="Square training resolution, a multiple of 8.")
    data.add_argument("--random_crop", action="store_true", help="Random instead of center crop.")
    data.add_argument("--no_hflip", action="store_true", help="No random horizontal flips.")
    data.add_argument("--max_bad_fraction", type=float, default=0.05,
                      help="Stop when more than this fraction of rows has unreadable images.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Processes decoding images; 0 decodes in the training process.")

    inversion = parser.add_argument_group("inversion and its cache (see inversion.py, trajectory_cache.py)")
    inversion.add_argument("--num_inference_steps", type=int, default=80, help="DDIM inversion steps N.")
    inversion.add_argument("--inversion_steps_offset", type=int, default=None,
                           help="steps_offset of the inversion schedule (default: the model's scheduler config; SDXL "
                                "says 1, timesteps 1, 13, ..., 949 at N = 80). The released code used 0 (0, 12, ..., "
                                "948): give 0 to reproduce it.")
    inversion.add_argument("--inversion_guidance_scale", type=float, default=2.0,
                           help="Classifier-free guidance of the reference's inversion (and, unless "
                                "--loss_guidance_scale says otherwise, of the loss's predictions); 1 runs the "
                                "conditional branch only (half the compute).")
    inversion.add_argument("--anchor_points", choices=["inversion", "standardised", "noised"], default=None,
                           help="Where the anchored form (inversion_dpo_x0) takes its errors. standardised (its "
                                "default): the reference's inversion path with each point's noise relative to x_0 "
                                "standardised per image, step and channel (inversion.standardised_trajectory), so "
                                "that the points have the statistics of the sampler's noise; on the toy properties "
                                "held out from every choice it never moved the model against the preference, where "
                                "the plain path did (docs/study.md, 'Settings that transfer'). inversion: the plain "
                                "path, as the paper. noised: a diagnostic, fresh forward noisings of x_0 at the same N "
                                "levels (no inversion, no cache). The other forms take the plain path.")
    inversion.add_argument("--inversion_cache_dir", default=None,
                           help="Keep what a step needs that does not depend on the policy here, and reuse it across "
                                "epochs, runs and sweeps: each image's latent and caption conditioning (keyed by its "
                                "pixels after crop and flip, caption, size ids and the encoders' weights) and its "
                                "inversion trajectory with the reference's errors (keyed by that, the reference's "
                                "weights and the settings). Warm, a step runs the policy alone (diffusion_dpo: the "
                                "policy and reference, no VAE or text encoder).")
    inversion.add_argument("--inversion_cache_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                           help="bfloat16 halves the disk and rounds the stored noise; float32 reproduces an uncached "
                                "run bit for bit.")
    inversion.add_argument("--fill_inversion_cache", action="store_true",
                           help="Only fill --inversion_cache_dir for the dataset and settings (every process takes its "
                                "share), then exit.")

    loss = parser.add_argument_group("loss (see losses.py)")
    loss.add_argument("--loss_type", default="inversion_dpo_x0", choices=losses.LOSS_TYPES,
                      help="inversion_dpo_x0 (default): the anchored form (the denoising error toward x_0's "
                           "noise, at the inversion's points, standardised by default: --anchor_points); the best "
                           "inversion form in the project's toy studies, never against the preference there, but "
                           "below diffusion_dpo on every property (docs/study.md, 'Settings that transfer'). "
                           "inversion_dpo: the paper's loss; it has no gradient until something breaks the "
                           "policy/reference tie, and its effect changed with the training seed there. "
                           "inversion_dpo_official: the released code's sign (opposite to the paper; for "
                           "reproduction only). inversion_dpo_exact: the trajectory-consistent form (moved the "
                           "model against the preference there). diffusion_dpo, sft: baselines.")
    loss.add_argument("--beta_dpo", type=float, default=None,
                      help="DPO temperature. Default: for inversion_dpo_x0 the relative rule (--relative_beta); "
                           "2000 for the other inversion forms (the released recipe's), 5000 for diffusion_dpo.")
    loss.add_argument("--relative_beta", type=float, default=RELATIVE_BETA,
                      help="The anchored form's default temperature rule: beta = RELATIVE_BETA / R, where R is the "
                           "reference's own step-weighted error on the first batch's trajectories (mean over every "
                           "process's images of (1/N) sum_i w_i E_i(ref)), measured once, logged, and kept on "
                           "resume. Beta in units of the model's own error, so that one value can carry over between "
                           "models, resolutions, N and weightings, where an absolute beta does not (docs/study.md, "
                           "'Settings that transfer'). Ignored when --beta_dpo is given.")
    loss.add_argument("--timestep_weighting", default="official", choices=losses.WEIGHTINGS,
                      help="official: w_i = 1/(2 a(tau_i)); uniform: w_i = 1.")
    loss.add_argument("--loss_timesteps", type=int, default=None,
                      help="Evaluate the policy at M of the N steps per pair and update, drawn by "
                           "--loss_timestep_sampling (default: all N). Each draw's estimate of S is unbiased; the "
                           "loss of that estimate is not an unbiased estimate of the loss "
                           "(docs/speed_and_memory.md, 'What a step costs').")
    loss.add_argument("--loss_timestep_sampling", default=None, choices=losses.LOSS_STEP_SAMPLINGS,
                      help="How --loss_timesteps draws its M steps (the same for a pair's winner and loser): "
                           "stratified (the default: one step from each of M consecutive blocks of the schedule, "
                           "proportional to w_i inside its block); weighted (M draws with probability proportional "
                           "to the step's weight w_i, each term divided by its probability; at M = 1 the same "
                           "draw as stratified); uniform (M distinct steps, equally likely: the draw before "
                           "stratified became the default). METHOD.md section 8; docs/speed_and_memory.md, 'What a step costs'.")
    loss.add_argument("--loss_guidance_scale", type=float, default=None,
                      help="Classifier-free guidance of the policy's and reference's predictions in the exact and "
                           "anchored losses (default: --inversion_guidance_scale). 1 compares the conditional "
                           "predictions alone, as Diffusion-DPO does: one model pass per trajectory point instead "
                           "of two, whatever guidance the inversion followed. FLUX: its guidance embedding. The "
                           "paper forms compare with the inversion's own predictions, so they take the inversion's.")
    loss.add_argument("--init_perturbation", type=float, default=0.0,
                      help="Add Gaussian noise to the trainable weights before training: std this times each "
                           "tensor's RMS, or this itself for an all-zero tensor (LoRA's B). A symmetry breaker for "
                           "studying the paper and released forms, which have no gradient while the policy equals "
                           "the reference (docs/study.md, 'Zero gradient at the start'); 0 (default) adds none.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=1e-8, help="Peak learning rate (before --scale_lr).")
    optim.add_argument("--scale_lr", action="store_true",
                       help="lr x gradient_accumulation_steps x train_batch_size x processes, as released.")
    optim.add_argument("--lr_scheduler", default="constant_with_warmup",
                       help="Any diffusers scheduler: constant, constant_with_warmup, linear, cosine, ...")
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up, in optimiser steps.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Cycles of cosine_with_restarts.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    optim.add_argument("--use_adafactor", action="store_true", help="Adafactor (the released SDXL recipe).")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Decoupled weight decay (also Adafactor's).")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip threshold; 0 turns clipping off.")
    optim.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="Stop after this many optimiser steps in a row whose loss or gradient is not finite "
                            "(each is skipped: no weight or optimiser state changes).")
    optim.add_argument("--train_batch_size", type=int, default=1, help="Pairs per process per micro-step.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps (overrides epochs).")
    optim.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, when --max_train_steps is not given.")
    optim.add_argument("--seed", type=int, default=0, help="Seed of weights init (LoRA), data order, crops and noise.")

    speed = parser.add_argument_group("memory, speed and scaling (several GPUs: accelerate config)")
    speed.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="Default: accelerate's config. Trainable weights stay fp32.")
    speed.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    speed.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute the model's activations in backward: less memory, more compute.")
    speed.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention (default: PyTorch SDPA).")
    speed.add_argument("--trajectory_chunk_size", type=chunk_size, default=1,
                       help="Inversion steps per model call along a trajectory (K). K < N computes the gradient K "
                            "steps at a time: the same gradient as one graph, with the memory of one chunk, for "
                            "one extra pass without gradient. K >= N holds all N steps in one graph, as released. "
                            "auto: the largest K whose memory budget (--memory_budget) fits the card.")
    speed.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the policy and reference models in place (state dicts and "
                            "checkpoints unchanged). The first steps compile, and so does each new batch shape.")
    speed.add_argument("--torch_compile_backend", default=None,
                       help="torch.compile backend (default inductor; eager checks the wiring without "
                            "generating code).")
    speed.add_argument("--torch_compile_mode", default=None,
                       choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                       help="inductor's compile mode (default: default).")
    speed.add_argument("--memory_budget", action="store_true",
                       help="Print the run's expected peak memory, part by part, and the flags that would bring "
                            "it under the card's memory, then exit without training (loads the policy, not the "
                            "reference; runs one small probe of its activations).")
    speed.add_argument("--memory_limit_gib", type=float, default=None,
                       help="The memory the budget and --trajectory_chunk_size auto fit into (default: the "
                            "card's total memory; unknown on a CPU, where auto takes every step).")
    speed.add_argument("--profile_step", type=int, default=None,
                       help="Profile optimiser step K of this invocation's run (torch.profiler, CPU and CUDA): "
                            "profile_step_K.txt (the profiler's table) and profile_step_K.json (top kernels, "
                            "the shares of time in matmul, attention and the rest) in output_dir.")
    speed.add_argument("--peak_tflops", type=float, default=None,
                       help="The card's dense bf16 peak in TFLOP/s, for the mfu of metrics.jsonl (default: "
                            "from the card's name, step_meter.DENSE_BF16_TFLOPS; unknown cards and CPUs log null). "
                            "Where a peak is known the run's first step is FLOP-counted (and slower).")

    output = parser.add_argument_group("checkpoints and logging")
    output.add_argument("--output_dir", default="inversion-dpo-output", help="Where everything is written.")
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save checkpoint-N every this many steps.")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    output.add_argument("--resume_from_checkpoint", default=None,
                        help='A checkpoint-N folder, or "latest" (the newest intact one in output_dir; none there: '
                             'a new run). The checkpoint\'s files are checked against the sizes and hashes it '
                             'recorded, and the settings that define the run against its own: a changed one stops '
                             'the run before any model loads (see --allow_changed_settings). A run already at '
                             '--max_train_steps trains nothing.')
    output.add_argument("--allow_changed_settings", action="store_true",
                        help="Resume although settings that define the run changed (each change is logged and "
                             "recorded in run_history.jsonl). Without it, only these may change on resume: "
                             + ", ".join(f"--{name}" for name in runs.RESUMABLE) + ".")
    output.add_argument("--overwrite_output_dir", action="store_true",
                        help="Start a new run in an output_dir that holds another run: first removes what that run "
                             "wrote (checkpoints, metrics, records, model, card, images, logs; nothing else). Without "
                             "it such a folder stops the run, which says how to resume it.")
    output.add_argument("--save_pipeline", action="store_true", help="Also save the whole pipeline in output_dir.")
    output.add_argument("--push_to_hub", action="store_true",
                        help="Upload output_dir (the model, the LoRA file, the model card, metrics; not the "
                             "checkpoints) to the hub at the end, as the diffusers examples do. Untested here (no "
                             "network): everything up to the upload is.")
    output.add_argument("--hub_model_id", default=None,
                        help="The hub repository to create or update (default: output_dir's name under your user).")
    output.add_argument("--hub_token", default=None,
                        help="A hub token (default: the one `huggingface-cli login` stored). Not with "
                             "--report_to wandb, which would log it.")
    output.add_argument("--report_to", default=None,
                        help='tensorboard (default when installed), wandb, all, or "none".')
    output.add_argument("--logging_dir", default="logs", help="Tracker logs, under output_dir.")
    output.add_argument("--tracker_project_name", default="inversion-dpo", help="Project name in the trackers.")
    output.add_argument("--validation_prompts", nargs="*", default=None,
                        help="Prompts sampled every --validation_steps (none: no validation).")
    output.add_argument("--validation_steps", type=int, default=200, help="Optimiser steps between validations.")
    output.add_argument("--validation_seeds", type=int, nargs="+", default=[0, 1],
                        help="One image per prompt and seed; the grid has a row per prompt.")
    output.add_argument("--validation_guidance_scale", type=float, default=5.0, help="Guidance for validation images.")
    output.add_argument("--validation_num_inference_steps", type=int, default=25, help="Sampling steps for validation.")
    return parser


def parse_args(input_args=None):
    parser = build_parser()
    args = parser.parse_args(input_args)
    validate_args(parser, args)
    return args


def chunk_size(value):
    """--trajectory_chunk_size: a positive integer, or auto."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number of steps, at least 1, or auto")
    return number


def validate_args(parser, args):
    """Bad configurations fail here, before any model loads, with the flag named."""
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("no dataset: give --dataset_name (hub id or local path) or --train_data_dir (local folder)")
    if args.resolution <= 0 or args.resolution % 8:
        parser.error(f"--resolution {args.resolution} must be a positive multiple of 8 (the VAE downsamples by 8)")
    if not 1 <= args.num_inference_steps <= 1000:
        parser.error(f"--num_inference_steps {args.num_inference_steps} must be from 1 to 1000 "
                     "(the model's training timesteps)")
    lora_flags = [f"--{name}" for name in ("rank", "lora_alpha", "lora_target_modules") if getattr(args, name) is not None]
    if lora_flags and not args.use_lora:
        parser.error(f"{', '.join(lora_flags)} given without --use_lora; add --use_lora or drop them")
    if args.loss_timesteps is not None and not 1 <= args.loss_timesteps <= args.num_inference_steps:
        parser.error(f"--loss_timesteps {args.loss_timesteps} must be from 1 to --num_inference_steps "
                     f"({args.num_inference_steps})")
    if args.loss_timestep_sampling is not None and args.loss_timesteps is None:
        parser.error("--loss_timestep_sampling draws the steps of --loss_timesteps M; give --loss_timesteps too")
    if args.loss_timesteps is not None and args.loss_timestep_sampling is None:
        args.loss_timestep_sampling = "stratified"
    if args.loss_guidance_scale is None:
        args.loss_guidance_scale = args.inversion_guidance_scale
    elif args.loss_type in PAPER_FORMS and args.loss_guidance_scale != args.inversion_guidance_scale:
        parser.error(f"--loss_type {args.loss_type} compares the policy with the inversion's own predictions, so its "
                     "loss guidance is --inversion_guidance_scale; drop --loss_guidance_scale or use "
                     "--loss_type inversion_dpo_x0 or inversion_dpo_exact")
    if args.loss_type in NOISING_FORMS and args.loss_timesteps is not None:
        parser.error(f"--loss_timesteps draws inversion steps; --loss_type {args.loss_type} draws one noise level per "
                     "pair itself")
    compile_flags = [f"--{name}" for name in ("torch_compile_backend", "torch_compile_mode")
                     if getattr(args, name) is not None]
    if compile_flags and not args.torch_compile:
        parser.error(f"{', '.join(compile_flags)} given without --torch_compile; add --torch_compile or drop them")
    if args.torch_compile_mode and (args.torch_compile_backend or "inductor") != "inductor":
        parser.error("--torch_compile_mode applies to the inductor backend only; drop it or --torch_compile_backend")
    if args.inversion_steps_offset is not None and args.inversion_steps_offset < 0:
        parser.error(f"--inversion_steps_offset {args.inversion_steps_offset} must be 0 or more")
    if args.init_perturbation < 0:
        parser.error("--init_perturbation must be 0 or more")
    if args.max_nonfinite_steps < 1:
        parser.error("--max_nonfinite_steps must be at least 1")
    if args.fill_inversion_cache and not args.inversion_cache_dir:
        parser.error("--fill_inversion_cache needs --inversion_cache_dir")
    if args.streaming and args.max_train_steps is None and not args.fill_inversion_cache:
        parser.error("--streaming datasets have no length: give --max_train_steps")
    if args.use_adafactor and args.use_8bit_adam:
        parser.error("choose one of --use_adafactor and --use_8bit_adam")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        parser.error("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if args.beta_dpo is None:
        args.beta_dpo = DEFAULT_BETA[args.loss_type]
    if not args.relative_beta > 0:
        parser.error("--relative_beta must be positive")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        parser.error("--hub_token with --report_to wandb would log the token: log in with `huggingface-cli login` "
                     "instead and drop --hub_token")
    if (args.hub_model_id or args.hub_token) and not args.push_to_hub:
        parser.error("--hub_model_id and --hub_token apply to --push_to_hub; add it or drop them")
    if args.profile_step is not None and args.profile_step < 1:
        parser.error("--profile_step counts optimiser steps from 1")
    if args.memory_limit_gib is not None and not args.memory_limit_gib > 0:
        parser.error("--memory_limit_gib must be positive")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error("--peak_tflops must be positive (the card's dense bf16 peak in TFLOP/s)")
    if args.anchor_points not in (None, "inversion") and args.loss_type != "inversion_dpo_x0":
        parser.error(f"--anchor_points {args.anchor_points} applies to --loss_type inversion_dpo_x0 only")
    if args.anchor_points is None:  # the anchored form's default; the other forms use the plain path
        args.anchor_points = "standardised" if args.loss_type == "inversion_dpo_x0" else "inversion"
    if args.anchor_points == "noised" and args.inversion_cache_dir:
        parser.error(f"--anchor_points {args.anchor_points} computes its points and reference terms every step: "
                     "drop --inversion_cache_dir")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir removes the run that --resume_from_checkpoint would resume: give one")
    if args.use_lora:
        args.rank = args.rank or 8
        args.lora_alpha = args.lora_alpha or args.rank
    if args.max_sequence_length is not None and args.max_sequence_length < 1:
        parser.error("--max_sequence_length must be at least 1")
    if args.report_to is None:
        args.report_to = "tensorboard" if _installed("tensorboard") else "none"
    args.cache_dir_model = args.cache_dir_model or args.cache_dir
