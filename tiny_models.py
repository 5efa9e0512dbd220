"""Tiny SDXL- and SD1.x-shaped pipelines with random weights, built in code and saved in diffusers format.

Tests, the demo and the benchmarks use them in place of the real checkpoints: the folders load with
`StableDiffusionXLPipeline.from_pretrained` / `StableDiffusionPipeline.from_pretrained` and go through exactly the
loading and training code the real models do, on a CPU, in seconds, with nothing downloaded.

    python tiny_models.py sdxl /tmp/tiny-sdxl
"""

import argparse
import json
import os
import string
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# The noise schedule keys of SDXL base 1.0 and SD 1.5 (scaled_linear 0.00085..0.012, "leading" spacing,
# steps_offset 1, no clipping, final alpha taken from a(0)).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

TEXT_WIDTH = 32  # hidden size of each tiny text encoder
MAX_TOKENS = 16  # tokenizer length; the real CLIP uses 77


def _tokenizer(pad_token):
    """A CLIP BPE tokenizer over single characters (no merges): every word splits into letters."""
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.json")
        merges_file = os.path.join(scratch, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=MAX_TOKENS)
    return tokenizer


def _text_config(vocab_size, projection_dim=TEXT_WIDTH):
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,  # >= 2: SDXL reads the penultimate hidden state
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )


def _vae():
    # Four blocks: three downsamplings, SDXL's 8x spatial factor, 4 latent channels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )


def _unet(cross_attention_dim, sdxl):
    extra = {}
    if sdxl:
        # SDXL's micro-conditioning: 6 time_ids embedded with width 8, concatenated to the pooled text embedding.
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=16,
        **extra,
    )


def build_tiny_sdxl(seed=0):
    """A StableDiffusionXLPipeline with SDXL's structure: two CLIP encoders, a text_time UNet, an 8x VAE."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer("<|endoftext|>")
    tokenizer_2 = _tokenizer("!")
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2)))
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(cross_attention_dim=2 * TEXT_WIDTH, sdxl=True),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd(seed=0):
    """A StableDiffusionPipeline with SD1.x's structure: one CLIP encoder, a plain cross-attention UNet."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer("<|endoftext|>")
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=TEXT_WIDTH, sdxl=False),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_clip(folder, seed=0, projection_dim=TEXT_WIDTH):
    """A tiny CLIPModel (32 px images) and its processor, saved where `CLIPModel.from_pretrained` and
    `AutoProcessor.from_pretrained` find them: a stand-in for PickScore or CLIP scorers in tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = _tokenizer("<|endoftext|>")
    vision = dict(hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    config = CLIPConfig(text_config=_text_config(len(tokenizer)).to_dict(), vision_config=vision,
                        projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


BUILDERS = {"sdxl": build_tiny_sdxl, "sd": build_tiny_sd}


def save_tiny_pipeline(kind, folder, seed=0):
    """Build the tiny `kind` ("sdxl" or "sd") pipeline and save it to `folder` in diffusers format."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {sorted(BUILDERS)}")
    pipeline = BUILDERS[kind](seed=seed)
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(BUILDERS))
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_tiny_pipeline(args.kind, args.folder, args.seed))
