"""What differs between model families (SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1), in one place: detection from the model
folder, loading, the caption conditioning and prompt encoders (as each pipeline encodes captions), how each network
is called (latent packing, position ids, timestep scale, guidance embedding), LoRA, and saving the trained model.
Adding a family: an entry in MODEL_KINDS (and FLOW_KINDS for a rectified flow), its prompt encoder class, its branch
of `model_prediction`, and its schedule in inversion.py (docs/development.md).

`Conditioning`, the prompt encoders and `model_prediction` are pure tensor code; the loaders read model folders.
"""

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("train_inversion_dpo")

# Model kinds, read from the model folder: pipeline class, the denoiser's subfolder and class (all diffusers names).
MODEL_KINDS = {
    "sd": ("StableDiffusionPipeline", "unet", "UNet2DConditionModel"),
    "sdxl": ("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel"),
    "sd3": ("StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "transformer", "FluxTransformer2DModel"),
}


FLOW_KINDS = ("sd3", "flux")  # rectified flows: Euler inversion, velocity targets (METHOD.md section 7)


DEFAULT_LORA_TARGETS = {  # peft matches these names at the end of module paths
    "unet": "to_k,to_q,to_v,to_out.0",
    # every attention projection of the joint (image and text) blocks, as diffusers' SD3 and FLUX LoRA scripts
    "transformer": "to_k,to_q,to_v,to_out.0,add_k_proj,add_q_proj,add_v_proj,to_add_out",
}


DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' defaults


def _installed(module):
    return importlib.util.find_spec(module) is not None


def diffusers_class(name):
    import diffusers

    return getattr(diffusers, name)


def detect_model_kind(args, source):
    """("sd", "sdxl", "sd3" or "flux", the pipeline index), read from the model folder: its pipeline index names the
    transformer of SD3 and FLUX; a UNet with SDXL's text_time embedding is SDXL, any other UNet SD1.x/2.x."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    path = args.pretrained_model_name_or_path
    try:
        index = DiffusionPipeline.load_config(path, **source)
    except EnvironmentError:  # no model_index.json: a folder holding the UNet's subfolders only
        index = {}
    transformer = (index.get("transformer") or [None, None])[1]
    if transformer is not None:
        kinds = {model: kind for kind, (_, _, model) in MODEL_KINDS.items()}
        if transformer not in kinds:
            raise ValueError(f"{path} has a {transformer}; supported transformers are SD3Transformer2DModel (SD3, "
                             "SD3.5) and FluxTransformer2DModel (FLUX.1)")
        kind = kinds[transformer]
    else:
        unet_config = UNet2DConditionModel.load_config(path, subfolder="unet", **source)
        kind = "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"
    if args.sdxl and kind != "sdxl":
        raise ValueError(f"--sdxl was given but {path} is not an SDXL model (it is {kind})")
    return kind, index


def load_models(args):
    """The model's kind, tokenizers, text encoders, VAE, the policy (its UNet or transformer: "denoiser") and the
    scheduler config (the reference: `load_reference`)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    source = dict(revision=args.revision, cache_dir=args.cache_dir_model)
    path = args.pretrained_model_name_or_path
    kind, index = detect_model_kind(args, source)
    # SD3 without T5: asked for, or a model saved without it (its index holds no text_encoder_3), as diffusers allows
    no_t5 = kind == "sd3" and (args.no_t5 or (index.get("text_encoder_3") or [None])[0] is None)
    if kind != "sd3" and args.no_t5:
        raise ValueError(f"--no_t5 applies to SD3 models only; {path} is {kind}")
    if kind not in FLOW_KINDS and args.max_sequence_length is not None:
        raise ValueError(f"--max_sequence_length applies to SD3 and FLUX (T5) only; {path} is {kind}")
    encoder_classes = {"sd": [CLIPTextModel], "sdxl": [CLIPTextModel, CLIPTextModelWithProjection],
                       "sd3": [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel],
                       "flux": [CLIPTextModel, T5EncoderModel]}[kind]
    tokenizers, text_encoders = [], []
    for number, encoder_class in enumerate(encoder_classes, start=1):
        suffix = "" if number == 1 else f"_{number}"
        if encoder_class is T5EncoderModel and no_t5:
            tokenizers.append(None)
            text_encoders.append(None)
            continue
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{suffix}", **source))
        text_encoders.append(encoder_class.from_pretrained(path, subfolder=f"text_encoder{suffix}",
                                                           variant=args.variant, **source))
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir_model)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **source)
    _, subfolder, model_class = MODEL_KINDS[kind]
    denoiser = diffusers_class(model_class).from_pretrained(path, subfolder=subfolder, variant=args.variant, **source)
    scheduler_config = DDIMScheduler.load_config(path, subfolder="scheduler", **source)
    return dict(kind=kind, tokenizers=tokenizers, text_encoders=text_encoders, vae=vae, denoiser=denoiser,
                scheduler_config=scheduler_config)


def make_prompt_encoder(args, models):
    """Captions -> conditioning, as the model's pipeline encodes them."""
    kind = models["kind"]
    length = args.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH.get(kind)
    if kind == "sd3":
        return SD3PromptEncoder(models["tokenizers"], models["text_encoders"], length,
                                models["denoiser"].config.joint_attention_dim)
    if kind == "flux":
        return FluxPromptEncoder(models["tokenizers"], models["text_encoders"], length)
    return PromptEncoder(models["tokenizers"], models["text_encoders"])


def load_reference(args, kind, device, dtype):
    """Full fine-tune: a second, frozen copy of the base model, kept on the device in the mixed-precision dtype."""
    _, subfolder, model_class = MODEL_KINDS[kind]
    logger.info("loading the reference %s", "UNet" if subfolder == "unet" else "transformer")
    reference = diffusers_class(model_class).from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder,
                                                             variant=args.variant, revision=args.revision,
                                                             cache_dir=args.cache_dir_model)
    reference.requires_grad_(False).eval().to(device, dtype=dtype)
    if args.enable_xformers_memory_efficient_attention:
        reference.enable_xformers_memory_efficient_attention()
    return compile_model(reference, args)


def compile_model(model, args):
    """--torch_compile: nn.Module.compile, in place, so the module keeps its class, state dict keys and hooks
    (checkpoints, LoRA saving and DDP see the plain module). Without the flag, the module as it is."""
    if args.torch_compile:
        model.compile(backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)
    return model


def add_lora(model, args):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                target_modules=[m.strip() for m in args.lora_target_modules.split(",")]))


@contextlib.contextmanager
def reference_mode(model):
    """LoRA: the reference is the same model with its adapters switched off."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
             "flux": "FluxPipeline"}


def save_model(model, args, kind, folder):
    """unet/ or transformer/ in diffusers format (full), or the pipeline's LoRA file (`pipe.load_lora_weights`)."""
    pipeline_name, subfolder, _ = MODEL_KINDS[kind]
    if args.use_lora:
        from peft.utils import get_peft_model_state_dict

        diffusers_class(pipeline_name).save_lora_weights(
            folder, **{f"{subfolder}_lora_layers": get_peft_model_state_dict(model)}, safe_serialization=True)
    else:
        model.save_pretrained(os.path.join(folder, subfolder), safe_serialization=True)


def build_pipeline(models, denoiser, scheduler_config):
    """The model's own pipeline around `denoiser`, for validation images and --save_pipeline."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    kind = models["kind"]
    pipeline_name, subfolder, _ = MODEL_KINDS[kind]
    scheduler_class = FlowMatchEulerDiscreteScheduler if kind in FLOW_KINDS else DDIMScheduler
    parts = {subfolder: denoiser, "vae": models["vae"], "scheduler": scheduler_class.from_config(scheduler_config)}
    for number, (tokenizer, encoder) in enumerate(zip(models["tokenizers"], models["text_encoders"]), start=1):
        suffix = "" if number == 1 else f"_{number}"
        parts.update({f"tokenizer{suffix}": tokenizer, f"text_encoder{suffix}": encoder})
    if kind == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = diffusers_class(pipeline_name)(**parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """What a denoiser is conditioned on, one row per sample.

    prompt_embeds: (B, L, D) text states: SD1.x/2.x its encoder's last; SDXL both encoders' penultimate, concatenated;
        SD3 the two CLIP encoders' penultimate (concatenated, zero-padded to T5's width) followed by T5's; FLUX T5's.
    pooled_prompt_embeds: (B, P) SDXL: the projected pooled output of text encoder 2; SD3: both CLIP projections
        concatenated; FLUX: CLIP's pooled output.
    time_ids: (B, 6) SDXL only: original (h, w), crop (top, left), target (h, w).
    kind: the network it feeds, one of KINDS: "unet" (SD1.x/2.x, SDXL), "sd3" (SD3Transformer2DModel) or "flux"
        (FluxTransformer2DModel); `model_prediction` calls each as its pipeline does.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    kind: str = "unet"

    KINDS = ("unet", "sd3", "flux")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown conditioning kind {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        batch = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "time_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(
                    f"Conditioning.{name} has batch size {value.shape[0]} but prompt_embeds has {batch}; "
                    "every field needs one row per sample"
                )
        if self.kind == "unet" and (self.pooled_prompt_embeds is None) != (self.time_ids is None):
            raise ValueError("SDXL conditioning needs both pooled_prompt_embeds and time_ids (or neither for SD1.x/2.x)")
        if self.kind != "unet" and (self.pooled_prompt_embeds is None or self.time_ids is not None):
            raise ValueError(f"{self.kind} conditioning needs pooled_prompt_embeds and no time_ids")

    def __len__(self):
        return self.prompt_embeds.shape[0]

    def _map(self, fn):
        return Conditioning(*(None if t is None else fn(t) for t in self._fields()), kind=self.kind)

    def _fields(self):
        return (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids)

    def repeat_interleave(self, repeats):
        """Each row repeated `repeats` times in place: rows b, b, ..., b+1, b+1, ..."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def select(self, index):
        """The rows at `index` (an int slice, a list or a tensor of indices)."""
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs):
        return self._map(lambda t: t.to(*args, **kwargs))

    @staticmethod
    def cat(parts):
        fields = list(zip(*(part._fields() for part in parts)))
        return Conditioning(*(None if field[0] is None else torch.cat(field) for field in fields), kind=parts[0].kind)

    def unet_kwargs(self, dtype):
        """Keyword arguments for `UNet2DConditionModel.forward`, cast to the UNet's dtype."""
        kwargs = {"encoder_hidden_states": self.prompt_embeds.to(dtype)}
        if self.pooled_prompt_embeds is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_prompt_embeds.to(dtype),
                "time_ids": self.time_ids.to(dtype),
            }
        return kwargs


def sdxl_time_ids(original_sizes, crop_top_lefts, target_size):
    """SDXL micro-conditioning, (B, 6): original (h, w) + crop (top, left) + target (h, w), as float32.

    original_sizes and crop_top_lefts are (B, 2) tensors; target_size is an (h, w) pair shared by the batch.
    """
    original_sizes = torch.as_tensor(original_sizes, dtype=torch.float32)
    crop_top_lefts = torch.as_tensor(crop_top_lefts, dtype=torch.float32)
    if original_sizes.shape != crop_top_lefts.shape or original_sizes.ndim != 2 or original_sizes.shape[1] != 2:
        raise ValueError(
            f"original_sizes {tuple(original_sizes.shape)} and crop_top_lefts {tuple(crop_top_lefts.shape)} "
            "must both be (B, 2)"
        )
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


class PromptEncoder:
    """Captions -> `Conditioning`, for SDXL (two tokenizers and encoders) or SD1.x/2.x (one).

    SDXL: each encoder's penultimate hidden state, concatenated on the feature axis; the pooled projection of encoder
    2; time_ids from each sample's original size and crop. SD1.x/2.x: the last hidden state of its one encoder.

    The unconditional branch of guidance is all zeros when `zero_unconditional` (SDXL's
    `force_zeros_for_empty_prompt`, the default for SDXL) and the embedding of the empty caption otherwise
    (the default for SD1.x/2.x).
    """

    kind = "unet"

    def __init__(self, tokenizers, text_encoders, zero_unconditional=None):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError(
                f"expected 1 (SD1.x/2.x) or 2 (SDXL) tokenizer/text-encoder pairs, got {len(tokenizers)} tokenizers "
                f"and {len(text_encoders)} text encoders"
            )
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.is_sdxl = len(text_encoders) == 2
        self.zero_unconditional = self.is_sdxl if zero_unconditional is None else zero_unconditional
        self._empty = None  # the empty caption's (prompt_embeds, pooled)

    @property
    def device(self):
        return self.text_encoders[0].device

    def _token_ids(self, tokenizer, captions):
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def _embed(self, captions):
        if not self.is_sdxl:
            (tokenizer,), (encoder,) = self.tokenizers, self.text_encoders
            return encoder(self._token_ids(tokenizer, captions))[0].float(), None
        states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            states.append(output.hidden_states[-2])
        pooled = output.text_embeds  # the projection head of the last encoder (CLIPTextModelWithProjection)
        return torch.cat(states, dim=-1).float(), pooled.float()

    def encode(self, captions, original_sizes=None, crop_top_lefts=None, target_size=None):
        """Conditioning for `captions` (a list of B strings, one per sample).

        SDXL also needs `original_sizes` and `crop_top_lefts` ((B, 2) each, (h, w) and (top, left)) and the
        `target_size` (h, w) the images were cropped to.
        """
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, one per sample, not a single string")
        prompt_embeds, pooled = self._embed(captions)
        if not self.is_sdxl:
            return Conditioning(prompt_embeds)
        if original_sizes is None or crop_top_lefts is None or target_size is None:
            raise ValueError("SDXL conditioning needs original_sizes, crop_top_lefts and target_size for its time_ids")
        time_ids = sdxl_time_ids(original_sizes, crop_top_lefts, target_size).to(prompt_embeds.device)
        if len(time_ids) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(time_ids)} original sizes; give one per sample")
        return Conditioning(prompt_embeds, pooled, time_ids)

    def unconditional(self, cond):
        """The unconditional counterpart of `cond` (same batch size and time_ids)."""
        if self.zero_unconditional:
            pooled = None if cond.pooled_prompt_embeds is None else torch.zeros_like(cond.pooled_prompt_embeds)
            return Conditioning(torch.zeros_like(cond.prompt_embeds), pooled, cond.time_ids)
        if self._empty is None:  # encoded once: the trainer asks every step
            self._empty = self._embed([""])
        prompt_embeds, pooled = self._empty
        batch = len(cond)
        pooled = None if pooled is None else pooled.expand(batch, -1)
        return Conditioning(prompt_embeds.expand(batch, -1, -1), pooled, cond.time_ids)


def _padded_ids(tokenizer, captions, max_length, device):
    return tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _check_captions(captions):
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings, one per sample, not a single string")


class SD3PromptEncoder:
    """Captions -> `Conditioning` as `StableDiffusion3Pipeline.encode_prompt` builds it: both CLIP encoders'
    penultimate states, concatenated and zero-padded to T5's width, followed by T5's last states
    (`max_sequence_length` tokens; zeros of the transformer's joint_attention_dim when the model has no T5, as
    diffusers does); pooled = both CLIP projections concatenated. Unconditional: the empty caption, encoded the same
    way (the pipeline's default negative prompt)."""

    kind = "sd3"

    def __init__(self, tokenizers, text_encoders, max_sequence_length, joint_attention_dim):
        if len(tokenizers) != 3 or len(text_encoders) != 3 or text_encoders[0] is None or text_encoders[1] is None:
            raise ValueError("SD3 conditioning needs three tokenizer/text-encoder slots: two CLIP encoders and T5 "
                             "(T5 may be None)")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.max_sequence_length, self.joint_attention_dim = max_sequence_length, joint_attention_dim
        self._empty = {}  # batch size -> the empty caption's conditioning

    @property
    def device(self):
        return self.text_encoders[0].device

    @torch.no_grad()
    def _embed(self, captions):
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            output = encoder(_padded_ids(tokenizer, captions, tokenizer.model_max_length, self.device),
                             output_hidden_states=True)
            states.append(output.hidden_states[-2].float())
            pooled.append(output.text_embeds.float())
        clip = torch.cat(states, dim=-1)
        t5_tokenizer, t5 = self.tokenizers[2], self.text_encoders[2]
        if t5 is None:
            t5_states = torch.zeros(len(captions), self.max_sequence_length, self.joint_attention_dim,
                                    device=self.device)
        else:
            t5_states = t5(_padded_ids(t5_tokenizer, captions, self.max_sequence_length, self.device))[0].float()
        if clip.shape[-1] > t5_states.shape[-1]:
            raise ValueError(f"the CLIP states ({clip.shape[-1]} wide) are wider than T5's ({t5_states.shape[-1]})")
        clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_states], dim=-2), torch.cat(pooled, dim=-1)

    def encode(self, captions, *unused_sizes):
        """Conditioning for `captions` (a list of B strings); SDXL's size arguments are accepted and unused."""
        _check_captions(captions)
        return Conditioning(*self._embed(captions), kind=self.kind)

    def unconditional(self, cond):
        """The empty caption's conditioning, one row per row of `cond` (encoded at that batch size, as the pipeline
        encodes its negative prompt: the same numbers bit for bit). Encoded once per batch size: the trainer asks
        every step."""
        batch = len(cond)
        if batch not in self._empty:
            self._empty[batch] = Conditioning(*self._embed([""] * batch), kind=self.kind)
        return self._empty[batch]


class FluxPromptEncoder:
    """Captions -> `Conditioning` as `FluxPipeline.encode_prompt` builds it: T5's last states
    (`max_sequence_length` tokens) and CLIP's pooled output. FLUX.1-dev takes guidance as an input embedding, so
    there is no unconditional branch: `unconditional` returns None."""

    kind = "flux"

    def __init__(self, tokenizers, text_encoders, max_sequence_length):
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise ValueError("FLUX conditioning needs two tokenizer/text-encoder pairs: CLIP and T5")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.max_sequence_length = max_sequence_length

    @property
    def device(self):
        return self.text_encoders[0].device

    @torch.no_grad()
    def encode(self, captions, *unused_sizes):
        """Conditioning for `captions` (a list of B strings); SDXL's size arguments are accepted and unused."""
        _check_captions(captions)
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        pooled = clip(_padded_ids(clip_tokenizer, captions, clip_tokenizer.model_max_length, self.device),
                      output_hidden_states=False).pooler_output.float()
        states = t5(_padded_ids(t5_tokenizer, captions, self.max_sequence_length, self.device))[0].float()
        return Conditioning(states, pooled, kind=self.kind)

    def unconditional(self, cond):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Noise prediction
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(model):
    return next(model.parameters()).dtype


def pack_latents(latents):
    """FLUX's packing of (B, C, H, W) latents into (B, H/2 * W/2, 4C) tokens of 2x2 patches (FluxPipeline's
    `_pack_latents`). A permutation: errors and Euler steps are the same in either layout."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {h}x{w} must be even (resolution a multiple of 16)")
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens, height, width):
    """The inverse of `pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W) for latent size `height` x `width`."""
    b, _, channels = tokens.shape
    tokens = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def flux_image_ids(height, width, device):
    """(H/2 * W/2, 3) position ids of the packed latent tokens: (0, row, column), as FluxPipeline makes them."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def model_prediction(model, latents, timesteps, cond, guidance=None):
    """One call of the denoiser as its pipeline makes it, float32 out, latents (B, C, H, W) in and out.

    timesteps (B,): the pipeline's timestep values (DDPM t; for flows sigma * num_train_timesteps). UNet: eps.
    SD3: velocity. FLUX: velocity, latents packed and ids built as FluxPipeline does, the timestep passed as
    t / 1000, and `guidance` (a float) as its guidance embedding when the model has one."""
    dtype = _compute_dtype(model)
    if cond.kind == "unet":
        return model(latents.to(dtype), timesteps, **cond.unet_kwargs(dtype)).sample.float()
    if cond.kind == "sd3":
        return model(hidden_states=latents.to(dtype), timestep=timesteps, encoder_hidden_states=cond.prompt_embeds.to(dtype),
                     pooled_projections=cond.pooled_prompt_embeds.to(dtype)).sample.float()
    height, width = latents.shape[-2:]
    batch = latents.shape[0]
    guidance_input = None
    if guidance is not None and getattr(_unwrapped(model).config, "guidance_embeds", False):
        guidance_input = torch.full((batch,), float(guidance), device=latents.device, dtype=torch.float32)
    output = model(hidden_states=pack_latents(latents).to(dtype), timestep=(timesteps / 1000).to(dtype),
                   guidance=guidance_input, pooled_projections=cond.pooled_prompt_embeds.to(dtype),
                   encoder_hidden_states=cond.prompt_embeds.to(dtype),
                   txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=latents.device, dtype=dtype),
                   img_ids=flux_image_ids(height, width, latents.device).to(dtype)).sample
    return unpack_latents(output.float(), height, width)


def _unwrapped(model):
    """The module inside a DDP wrapper (its config holds the model's settings)."""
    return getattr(model, "module", model)


def guided_noise_prediction(model, latents, timesteps, cond, uncond, guidance_scale):
    """The guided prediction e_u + g * (e_c - e_u) as float32 (a noise for UNets, a velocity for flows), with both
    halves in one call; g = 1 runs only the conditional half. FLUX conditioning takes g as the model's guidance
    embedding instead, in one conditional call (uncond unused).

    latents: (B, C, H, W); timesteps: a scalar or (B,) tensor; cond, uncond: `Conditioning` of batch B
    (uncond is unused, and may be None, when g = 1 or for FLUX).
    """
    batch = latents.shape[0]
    if len(cond) != batch:
        raise ValueError(f"latents have batch size {batch} but the conditioning has {len(cond)}; give one per sample")
    timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
    # One memory layout for every call: convolution kernels round differently on strided or channels-last inputs,
    # and the policy must see bit-for-bit the inputs the reference saw during inversion.
    latents = latents.contiguous()
    if cond.kind == "flux":
        return model_prediction(model, latents, timesteps, cond, guidance=guidance_scale)
    if guidance_scale == 1:
        return model_prediction(model, latents, timesteps, cond)
    if uncond is None or len(uncond) != batch:
        raise ValueError(f"guidance scale {guidance_scale} needs unconditional conditioning of batch size {batch}")
    both = Conditioning.cat([uncond, cond])
    prediction = model_prediction(model, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
    uncond_pred, cond_pred = prediction.chunk(2)
    return uncond_pred + guidance_scale * (cond_pred - uncond_pred)
