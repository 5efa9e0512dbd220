"""Full-sized stand-ins for SDXL base 1.0, SD3.5 medium and FLUX.1-dev: the real architectures and shapes (UNet or
transformer, text encoders, VAE) with random weights, built from configs written here, nothing downloaded. For
measuring speed and memory only: they compute what the real models compute, on the same shapes, to no purpose.

    python benchmarks/full_models.py sdxl /tmp/sdxl-random     # a diffusers folder the trainer loads, bf16 weights

Tokenizers are tiny_models' character-level ones (any id they give is a valid id of the real vocabularies); CLIP's
is set to the real 77 tokens.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import startup  # noqa: E402,F401  (before diffusers: quiets two start-up warnings)

# SDXL base 1.0's UNet (2.6B parameters)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# SD3.5 medium's transformer (2.5B parameters; MMDiT-X: dual attention in its first 13 blocks, RMS-normed q/k).
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# FLUX.1-dev's transformer (12B parameters: 19 double-stream and 38 single-stream blocks, guidance embedding).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# The text encoders: CLIP ViT-L/14's (123M), OpenCLIP ViT-bigG/14's (695M), T5 v1.1 XXL's encoder (4.7B).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=0,
              eos_token_id=1, pad_token_id=1)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)
# The VAEs: SDXL's (4 latent channels) and SD3's / FLUX's (16, scaled and shifted; no quantisation convolutions).
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
VAE_16 = {"sd3": dict(VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                      use_post_quant_conv=False),
          "flux": dict(VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)}
KINDS = ("sdxl", "sd3", "flux")


def build_full_pipeline(kind):
    """The `kind` pipeline at full size with random weights, built on the current default device and dtype."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    import tiny_models

    def clip_tokenizer(pad_token):
        tokenizer = tiny_models._tokenizer(pad_token)
        tokenizer.model_max_length = 77
        return tokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    torch.manual_seed(0)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
            tokenizer=clip_tokenizer("<|endoftext|>"), tokenizer_2=clip_tokenizer("!"),
            unet=UNet2DConditionModel(**SDXL_UNET), scheduler=DDIMScheduler(**tiny_models.SCHEDULER_CONFIG))
    if kind == "sd3":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(**tiny_models.SD3_SCHEDULER_CONFIG),
            vae=AutoencoderKL(**VAE_16["sd3"]),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            tokenizer=clip_tokenizer("<|endoftext|>"),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)), tokenizer_2=clip_tokenizer("!"),
            text_encoder_3=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_3=tiny_models._t5_tokenizer())
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**tiny_models.FLUX_SCHEDULER_CONFIG),
        vae=AutoencoderKL(**VAE_16["flux"]), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=clip_tokenizer("<|endoftext|>"), text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)),
        tokenizer_2=tiny_models._t5_tokenizer(), transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER))


def save_full_pipeline(kind, folder, device=None):
    """Build the full-sized `kind` pipeline (random weights, initialised on `device`: seconds on a GPU) in bfloat16
    and save it to `folder` in diffusers format. Returns `folder`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipeline = build_full_pipeline(kind)
    finally:
        torch.set_default_dtype(default)
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("folder")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    print(save_full_pipeline(args.kind, args.folder, args.device))
