"""Tiny SDXL-, SD1.x-, SD3- and FLUX-shaped pipelines with random weights, built in code and saved in diffusers format.

Tests, the demo and the benchmarks use them in place of the real checkpoints: the folders load with their pipelines'
`from_pretrained` (`StableDiffusionXLPipeline`, `StableDiffusionPipeline`, `StableDiffusion3Pipeline`,
`FluxPipeline`) and go through exactly the loading and training code the real models do, on a CPU, in seconds, with
nothing downloaded. Tokenizers are written here: character-level CLIP BPE and T5 unigram vocabularies.

    python tiny_models.py sdxl /tmp/tiny-sdxl
"""

import argparse
import json
import os
import string
import tempfile

import torch

import startup  # noqa: F401  (before diffusers: quiets two start-up warnings)
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

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

# The flow schedulers of SD3/SD3.5 (static shift 3) and FLUX.1-dev (shift with the image size).
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                         "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}

TEXT_WIDTH = 32  # hidden size of each tiny text encoder
T5_WIDTH = 64  # hidden size of the tiny T5 (the transformers' joint_attention_dim)
MAX_TOKENS = 16  # tokenizer length; the real CLIP uses 77


def _bpe(pieces, merges):
    """Byte-pair encoding as CLIP's tokenizer applies it: the adjacent pair merged first, again and again, is the
    one earliest in `merges`."""
    ranks = {tuple(merge.split()): rank for rank, merge in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


def _tokenizer(pad_token, words=()):
    """A CLIP BPE tokenizer over single characters: every word splits into letters, except `words`, whose merges
    (each word's letters joined left to right) make each of them one token."""
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = []
    for word in words:  # merge what BPE leaves of the word, with the merges so far, from the left
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.json")
        merges_file = os.path.join(scratch, "merges.txt")
        with open(vocab_file, "w") as f:
            json.dump(vocab, f)
        with open(merges_file, "w") as f:
            f.write("#version: 0.2\n" + "".join(merge + "\n" for merge in merges))
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


def _t5_tokenizer(words=()):
    """A T5 unigram tokenizer over single characters, "▁" marking word starts, as T5's sentencepiece does; each of
    `words` is one piece."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(symbol, -1.0) for symbol in string.ascii_lowercase + string.digits + ".,!?'-"]
    pieces += [("▁" + word, -1.0) for word in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _t5(vocab_size):
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_ff=64, d_kv=16, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def _vae(latent_channels=4, scaling_factor=0.13025, shift_factor=None):
    # Four blocks: three downsamplings, the real models' 8x spatial factor; 4 latent channels (SD, SDXL) or 16 with
    # a shift (SD3, FLUX).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
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


def build_tiny_sdxl(seed=0, words=()):
    """A StableDiffusionXLPipeline with SDXL's structure: two CLIP encoders, a text_time UNet, an 8x VAE. `words`:
    whole-word tokens (the compositional toy's vocabulary), else every word is spelt in letters."""
    torch.manual_seed(seed)
    tokenizer = _tokenizer("<|endoftext|>", words)
    tokenizer_2 = _tokenizer("!", words)
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


def build_tiny_sd3(seed=0, words=()):
    """A StableDiffusion3Pipeline with SD3's structure: two CLIP encoders with projections, T5, a joint-attention
    transformer over 2x2 patches of 16-channel latents (scaled and shifted), the shifted flow scheduler. `words`:
    whole-word tokens, as build_tiny_sdxl."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tokenizer("<|endoftext|>", words), _tokenizer("!", words)
    tokenizer_3 = _t5_tokenizer(words)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=8)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer_2))),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux(seed=0):
    """A FluxPipeline with FLUX.1-dev's structure: CLIP (pooled) and T5, a transformer of double and single blocks
    over packed 2x2 patches of 16-channel latents, rotary position ids, a guidance embedding, the resolution-shifted
    flow scheduler."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tokenizer("<|endoftext|>"), _t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_t5(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
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


BUILDERS = {"sdxl": build_tiny_sdxl, "sd": build_tiny_sd, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def save_tiny_pipeline(kind, folder, seed=0):
    """Build the tiny `kind` ("sdxl", "sd", "sd3" or "flux") pipeline and save it to `folder` in diffusers format."""
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
