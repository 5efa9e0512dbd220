"""SD3 and FLUX inside the trainer's maths: conditioning, calls and schedules against the pipelines' own code, the
inversion against Euler steps written out here, and every loss form in velocity space against its formula."""

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from inversion import FlowSchedule, invert
from models import FluxPromptEncoder, SD3PromptEncoder, model_prediction
from train_inversion_dpo import parse_args
from training import Reference, reference_errors, step_weights, trajectory_loss

CAPTIONS = ["a red square", "two blue circles"]
MAX_TOKENS = 16
GUIDANCE = {"sd3": 2.0, "flux": 3.5}
NUM_STEPS = 4


def sd3_encoder(pipe, with_t5=True):
    return SD3PromptEncoder([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3 if with_t5 else None],
                            [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3 if with_t5 else None],
                            MAX_TOKENS, pipe.transformer.config.joint_attention_dim)


def flux_encoder(pipe):
    return FluxPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], MAX_TOKENS)


@pytest.fixture(scope="module")
def models(sd3_pipe, flux_pipe):
    return {"sd3": (sd3_pipe, sd3_encoder(sd3_pipe)), "flux": (flux_pipe, flux_encoder(flux_pipe))}


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_conditioning_is_the_pipelines_encode_prompt(sd3_pipe, tiny_sd3_path, with_t5):
    from diffusers import StableDiffusion3Pipeline

    pipe = sd3_pipe if with_t5 else StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None,
                                                                              tokenizer_3=None)
    encoder = sd3_encoder(pipe, with_t5)
    with torch.no_grad():  # as the pipeline's __call__ runs it (grad mode picks other kernels, rounding differently)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                                       max_sequence_length=MAX_TOKENS)
    cond = encoder.encode(CAPTIONS)
    uncond = encoder.unconditional(cond)
    assert cond.kind == "sd3" and cond.prompt_embeds.shape == (2, MAX_TOKENS + MAX_TOKENS, 64)
    assert torch.equal(cond.prompt_embeds, embeds) and torch.equal(cond.pooled_prompt_embeds, pooled)
    assert torch.equal(uncond.prompt_embeds, negative) and torch.equal(uncond.pooled_prompt_embeds, negative_pooled)
    if not with_t5:  # diffusers puts zeros where T5's states would be
        assert (cond.prompt_embeds[:, MAX_TOKENS:] == 0).all()


def test_flux_conditioning_is_the_pipelines_encode_prompt(flux_pipe):
    with torch.no_grad():  # as the pipeline's __call__ runs it
        embeds, pooled, _ = flux_pipe.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=MAX_TOKENS)
    encoder = flux_encoder(flux_pipe)
    cond = encoder.encode(CAPTIONS)
    assert cond.kind == "flux" and torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(cond.pooled_prompt_embeds, pooled)
    assert encoder.unconditional(cond) is None  # guidance is an input embedding: no unconditional branch


def flux_call_by_the_pipeline(pipe, transformer, latents, timesteps, cond, guidance):
    """FLUX's transformer called as FluxPipeline's denoising loop calls it (its own packing and ids)."""
    b, c, h, w = latents.shape
    dtype = next(transformer.parameters()).dtype
    packed = pipe._pack_latents(latents, b, c, h, w)
    image_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
    text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, dtype=dtype)
    output = transformer(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype),
                         guidance=torch.full((b,), guidance, dtype=torch.float32),
                         pooled_projections=cond.pooled_prompt_embeds.to(dtype),
                         encoder_hidden_states=cond.prompt_embeds.to(dtype), txt_ids=text_ids,
                         img_ids=image_ids).sample
    return pipe._unpack_latents(output, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                pipe.vae_scale_factor).float()


def sd3_guided_by_hand(transformer, latents, timesteps, cond, uncond, guidance):
    """SD3's classifier-free guidance written out, one call per branch: v_u + g (v_c - v_u)."""
    dtype = next(transformer.parameters()).dtype

    def branch(c):
        return transformer(hidden_states=latents.to(dtype), timestep=timesteps,
                           encoder_hidden_states=c.prompt_embeds.to(dtype),
                           pooled_projections=c.pooled_prompt_embeds.to(dtype)).sample.float()

    v_u, v_c = branch(uncond), branch(cond)
    return v_u + guidance * (v_c - v_u)


def guided_by_hand(kind, pipe, transformer, latents, timesteps, cond, uncond):
    if kind == "sd3":
        return sd3_guided_by_hand(transformer, latents, timesteps, cond, uncond, GUIDANCE[kind])
    return flux_call_by_the_pipeline(pipe, transformer, latents, timesteps, cond, GUIDANCE[kind])


def test_flux_call_packs_and_positions_as_the_pipeline_does(flux_pipe, models):
    cond = models["flux"][1].encode(CAPTIONS)
    latents, timesteps = torch.randn(2, 16, 8, 8), torch.tensor([250.0, 800.0])
    expected = flux_call_by_the_pipeline(flux_pipe, flux_pipe.transformer, latents, timesteps, cond, 3.5)
    actual = model_prediction(flux_pipe.transformer, latents, timesteps, cond, guidance=3.5)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_schedule_is_the_one_the_pipeline_samples_with(models, kind):
    pipe, _ = models[kind]
    pipe(CAPTIONS[0], num_inference_steps=5, height=64, width=64, max_sequence_length=MAX_TOKENS,
         output_type="latent", generator=torch.Generator().manual_seed(0))
    schedule = FlowSchedule.for_pipeline(kind, pipe.scheduler.config, 5, latent_size=8)
    assert torch.equal(schedule.sigmas, pipe.scheduler.sigmas.float().flip(0))


@pytest.fixture(scope="module")
def inverted(models):
    """Per model kind: a float64 reference, 2 pairs (winners then losers, each pair its own caption) inverted over
    NUM_STEPS steps with the reference's term at every x_i, and the official weights."""
    torch.manual_seed(0)
    out = {}
    for kind, (pipe, encoder) in models.items():
        reference = copy.deepcopy(pipe.transformer).double().eval()
        cond = encoder.encode(CAPTIONS + CAPTIONS)
        uncond = encoder.unconditional(cond)
        schedule = FlowSchedule.for_pipeline(kind, pipe.scheduler.config, NUM_STEPS, latent_size=8)
        latents = torch.randn(4, 16, 8, 8)
        trajectories = invert(reference, latents, cond, uncond, schedule, GUIDANCE[kind])
        trajectories.reference_errors = reference_errors(trainer_args("inversion_dpo_x0", kind),
                                                         Reference(load=lambda: reference), trajectories, cond, uncond)
        out[kind] = dict(pipe=pipe, reference=reference, cond=cond, uncond=uncond, schedule=schedule,
                         trajectories=trajectories, weights=step_weights(schedule, "official"))
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_inversion_is_euler_steps_along_the_guided_velocity(inverted, kind):
    setup = inverted[kind]
    trajectories, sigmas = setup["trajectories"], setup["schedule"].sigmas.tolist()
    x = trajectories.latents[:, 0]
    for i in range(1, NUM_STEPS + 1):
        timesteps = torch.full((4,), sigmas[i] * 1000)
        v = guided_by_hand(kind, setup["pipe"], setup["reference"], x, timesteps, setup["cond"], setup["uncond"])
        x = x + (sigmas[i] - sigmas[i - 1]) * v
        # float64 model, one batched call against two: the same numbers up to float64 rounding, cast to float32
        torch.testing.assert_close(trajectories.noise[:, i - 1], v, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(trajectories.latents[:, i], x, rtol=1e-6, atol=1e-6)


FORMS = ["inversion_dpo", "inversion_dpo_official", "inversion_dpo_exact", "inversion_dpo_x0"]


def trainer_args(loss_type, kind, beta=100.0, *extra):
    return parse_args(["--pretrained_model_name_or_path", "unused", "--dataset_name", "unused", "--loss_type",
                       loss_type, "--num_inference_steps", str(NUM_STEPS), "--beta_dpo", str(beta),
                       "--inversion_guidance_scale", str(GUIDANCE[kind]), *extra])


def run_loss(setup, policy, args):
    policy.zero_grad(set_to_none=True)
    output = trajectory_loss(args, Accelerator(cpu=True), policy, setup["trajectories"], setup["cond"],
                             setup["uncond"], setup["weights"], torch.Generator())
    grads = [p.grad.flatten() for p in policy.parameters() if p.grad is not None]
    return output, torch.cat(grads) if grads else torch.zeros(1)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("loss_type", FORMS)
def test_at_the_reference_the_loss_is_log_2_and_only_the_paper_forms_lack_a_gradient(inverted, kind, loss_type):
    setup = inverted[kind]
    policy = copy.deepcopy(setup["reference"]).train()
    output, gradient = run_loss(setup, policy, trainer_args(loss_type, kind))
    assert output.loss.item() == pytest.approx(0.6931471805599453, abs=1e-7)
    if loss_type in ("inversion_dpo", "inversion_dpo_official"):
        assert gradient.abs().max().item() == 0.0  # the policy is evaluated where the reference made v_i
    else:
        assert gradient.norm().item() > 0


def written_out_scores(kind, setup, policy, loss_type):
    """S per image (winners then losers) from the formulas of METHOD.md section 7, one step and one image at a time,
    each image with its own caption."""
    trajectories, sigmas = setup["trajectories"], setup["schedule"].sigmas.tolist()
    scores = []
    for b in range(4):
        cond, uncond = setup["cond"].select([b]), None if setup["uncond"] is None else setup["uncond"].select([b])
        x = trajectories.latents[b:b + 1]
        total = 0.0
        for i in range(1, NUM_STEPS + 1):
            t = torch.full((1,), sigmas[i] * 1000)
            weight = ((1 - sigmas[i]) ** 2 + sigmas[i] ** 2) / 2
            v_i = trajectories.noise[b:b + 1, i - 1]
            if loss_type in ("inversion_dpo", "inversion_dpo_official"):
                prediction = guided_by_hand(kind, setup["pipe"], policy, x[:, i - 1], t, cond, uncond)
                total += weight * (prediction - v_i).pow(2).mean()
                continue
            target = v_i if loss_type == "inversion_dpo_exact" else (x[:, i] - x[:, 0]) / sigmas[i]
            prediction = guided_by_hand(kind, setup["pipe"], policy, x[:, i], t, cond, uncond)
            reference = guided_by_hand(kind, setup["pipe"], setup["reference"], x[:, i], t, cond, uncond)
            total += weight * ((prediction - target).pow(2).mean() - (reference - target).pow(2).mean())
        scores.append(total / NUM_STEPS)
    return torch.stack(scores)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("loss_type", FORMS)
def test_each_form_is_its_formula_with_per_pair_captions(inverted, kind, loss_type):
    setup = inverted[kind]
    policy = copy.deepcopy(setup["reference"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    with torch.no_grad():
        scores = written_out_scores(kind, setup, policy, loss_type)
    score_w, score_l = scores[:2], scores[2:]
    beta = 2.0 / (score_w - score_l).abs().max().item()  # margins of order 1: the loss sees each pair
    sign = 1.0 if loss_type == "inversion_dpo_official" else -1.0
    expected_loss = -F.logsigmoid(sign * beta / 2 * (score_w - score_l)).mean()
    output, _ = run_loss(setup, policy, trainer_args(loss_type, kind, beta))
    torch.testing.assert_close(output.metrics["score_w"].double(), score_w.mean().double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(output.metrics["score_l"].double(), score_l.mean().double(), rtol=1e-4, atol=0)
    torch.testing.assert_close(output.loss.double(), expected_loss.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("loss_type", ["inversion_dpo", "inversion_dpo_x0"])
def test_chunked_gradient_equals_one_graph_gradient(inverted, kind, loss_type):
    # float64 policy (see test_chunked_gradient.py): the gradients must agree to a float32 ulp of their size
    setup = inverted[kind]
    policy = copy.deepcopy(setup["reference"]).train()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    _, one_graph = run_loss(setup, policy, trainer_args(loss_type, kind, 100.0, "--trajectory_chunk_size",
                                                        str(NUM_STEPS)))
    _, chunked = run_loss(setup, policy, trainer_args(loss_type, kind, 100.0, "--trajectory_chunk_size", "1"))
    assert one_graph.norm() > 0
    assert ((chunked - one_graph).norm() / one_graph.norm()).item() <= torch.finfo(torch.float32).eps
