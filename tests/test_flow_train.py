"""train_inversion_dpo.py end to end on the tiny SD3 and FLUX pipelines, launched as a user launches it: full
fine-tune (SD3) and LoRA (both) train, save, resume exactly, load with the standard calls, and two processes equal
one with the same global batch."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import base_args, launch, pairs_dir, read_metrics  # noqa: F401

# Adam with a large epsilon: an update proportional to the gradient (see test_train's two-process test), so the
# two-process comparison measures the gradient's reduction, not the sign of rounding noise.
COMMON = ["--max_sequence_length", "16", "--learning_rate", "1e-3", "--adam_epsilon", "1.0"]
RUNS = {  # the default (anchored) form; random draws and their resume are tested on SDXL (test_train.py)
    "sd3": ["--checkpointing_steps", "2"],
    "flux": ["--use_lora", "--rank", "4", "--checkpointing_steps", "2"],
}


def model_file(folder, kind):
    if kind == "flux":
        return load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))
    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module", params=["sd3", "flux"])
def runs(request, tiny_sd3_path, tiny_flux_path, pairs_dir, tmp_path_factory):  # noqa: F811
    """One model kind's runs: 4 steps in one go; resumed from its checkpoint-2 to 4; 4 steps on 2 processes (1 pair
    each)."""
    kind = request.param
    model = {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[kind]
    folder = tmp_path_factory.mktemp(f"flow-{kind}")
    args = [*COMMON, *RUNS[kind]]
    if kind == "sd3":  # a float32 trajectory cache shared by the three runs: the first fills it, the others read it
        args += ["--inversion_cache_dir", str(folder / "cache"), "--inversion_cache_dtype", "float32"]
    one, resumed, two = folder / "one", folder / "resumed", folder / "two"
    launch(base_args(model, pairs_dir, one, *args, "--max_train_steps", "4"))
    # the second run starts from the first one's checkpoint-2, as a run stopped there would
    resumed.mkdir()
    shutil.copytree(one / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join((one / "metrics.jsonl").read_text().splitlines(True)[:2]))
    result = launch(base_args(model, pairs_dir, resumed, *args, "--max_train_steps", "4", "--resume_from_checkpoint",
                              "latest"))
    assert "resuming from" in result.stderr
    two_args = base_args(model, pairs_dir, two, *args, "--max_train_steps", "4", "--train_batch_size", "1")
    try:
        launch(two_args, processes=2, timeout=300)
    except subprocess.TimeoutExpired as hang:  # see test_train's two-process test
        warnings.warn(f"two-process run stalled; retried. Its last output:\n{(hang.stderr or '')[-3000:]}")
        shutil.rmtree(two, ignore_errors=True)
        launch(two_args, processes=2, timeout=300)
    return dict(kind=kind, model=model, one=one, resumed=resumed, two=two)


@pytest.mark.slow
def test_trains_and_resumes_exactly(runs):
    kind = runs["kind"]
    config = json.loads((runs["one"] / "training_config.json").read_text())
    assert config["model_kind"] == kind
    expected, resumed = model_file(runs["one"], kind), model_file(runs["resumed"], kind)
    assert sorted(resumed) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=0, msg=name)
    assert [m["step"] for m in read_metrics(runs["resumed"])] == [1, 2, 3, 4]
    if kind == "sd3":  # the resumed run read its trajectories from the cache the first run filled
        assert read_metrics(runs["resumed"])[-1]["cache_hits"] > 0 and read_metrics(runs["one"])[0]["cache_misses"] > 0
    assert all(m["grad_norm"] > 0 for m in read_metrics(runs["one"]))


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    single, double = model_file(runs["one"], runs["kind"]), model_file(runs["two"], runs["kind"])
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=1e-6, msg=name)
    assert read_metrics(runs["one"])[0]["grad_norm"] == pytest.approx(read_metrics(runs["two"])[0]["grad_norm"],
                                                                      rel=1e-5)


def test_outputs_load_with_the_standard_calls(runs):
    from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

    kind, out = runs["kind"], str(runs["one"])
    image = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                 output_type="pt")
    if kind == "sd3":
        base = SD3Transformer2DModel.from_pretrained(runs["model"], subfolder="transformer")
        trained = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
        assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
        for folder in (out, str(runs["one"] / "checkpoint-2")):  # checkpoints hold the same format
            SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
        pipe = StableDiffusion3Pipeline.from_pretrained(runs["model"], transformer=trained)
        assert pipe(**image).images.isfinite().all()
        return
    state = model_file(out, kind)
    assert state and all(key.startswith("transformer.") for key in state)
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())
    pipe = FluxPipeline.from_pretrained(runs["model"])
    before = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(out)
    after = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(before, after)


def test_sd3_lora_saves_a_file_the_pipeline_loads(tiny_sd3_path, pairs_dir, tmp_path):  # noqa: F811
    from diffusers import StableDiffusion3Pipeline

    launch(base_args(tiny_sd3_path, pairs_dir, tmp_path, *COMMON, "--use_lora", "--rank", "4", "--no_t5",
                     "--save_pipeline"))
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any(".add_q_proj.lora_B" in key for key in state)  # the text stream's projections are adapted too
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in state.items())
    # --save_pipeline: a whole pipeline with the adapter merged into plain weights, beside the LoRA file
    saved = StableDiffusion3Pipeline.from_pretrained(str(tmp_path), text_encoder_3=None, tokenizer_3=None)
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    assert not any("lora" in name for name in saved.transformer.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(saved.transformer.state_dict().values(),
                                                     base.transformer.state_dict().values()))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, text_encoder_3=None, tokenizer_3=None)
    image = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                 output_type="pt")
    before = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(tmp_path))
    after = pipe(**image, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(before, after)


@pytest.mark.parametrize("flag, message", [
    (["--inversion_steps_offset", "0"], "--inversion_steps_offset sets a DDIM schedule"),
    (["--sdxl"], "is not an SDXL model"),
])
def test_flags_that_do_not_apply_to_flows_are_named(tiny_flux_path, pairs_dir, tmp_path, flag, message):  # noqa: F811
    result = launch(base_args(tiny_flux_path, pairs_dir, tmp_path, *flag), check=False)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_recipe_scripts_run_with_overrides(tiny_sd3_path, tiny_flux_path, pairs_dir, tmp_path, kind):  # noqa: F811
    from test_train import ENV, ROOT

    model = {"sd3": tiny_sd3_path, "flux": tiny_flux_path}[kind]
    env = {**ENV, "ACCELERATE_ARGS": "--cpu --num_processes 1", "MODEL_NAME": model,
           "DATASET_NAME": str(pairs_dir / "pairs.jsonl"), "OUTPUT_DIR": str(tmp_path), "RESOLUTION": "64",
           "NUM_INFERENCE_STEPS": "3", "MAX_TRAIN_STEPS": "2", "MAX_SEQUENCE_LENGTH": "16",
           "GRADIENT_ACCUMULATION_STEPS": "1", "DATALOADER_NUM_WORKERS": "0"}
    result = subprocess.run(["bash", str(ROOT / f"{kind}.sh"), "--report_to", "none"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((tmp_path / "training_config.json").read_text())
    expected = dict(model_kind=kind, mixed_precision="bf16", use_lora=True, rank=8, learning_rate=1e-5,
                    beta_dpo=None, relative_beta=40.0, loss_type="inversion_dpo_x0", gradient_checkpointing=True,
                    inversion_guidance_scale={"sd3": 2.0, "flux": 3.5}[kind], max_sequence_length=16,
                    num_inference_steps=3, resolution=64, loss_timesteps=1, loss_timestep_sampling="stratified")
    assert {key: config[key] for key in expected} == expected
    betas = {json.loads(line)["beta"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert len(betas) == 1 and 0 < betas.pop() < float("inf")  # the rule's beta, set once from the first batch
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_an_sd3_folder_saved_without_t5_loads_without_it(sd3_pipe, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from models import load_models, make_prompt_encoder
    from train_inversion_dpo import parse_args

    parts = {**sd3_pipe.components, "text_encoder_3": None, "tokenizer_3": None}
    StableDiffusion3Pipeline(**parts).save_pretrained(tmp_path)  # model_index.json: text_encoder_3 [null, null]
    args = parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--dataset_name", "unused",
                       "--max_sequence_length", "16"])
    models = load_models(args)
    assert models["kind"] == "sd3" and models["text_encoders"][2] is None and models["tokenizers"][2] is None
    cond = make_prompt_encoder(args, models).encode(["a red square"])
    assert (cond.prompt_embeds[:, -16:] == 0).all()  # zeros where T5's states would be, as diffusers does


@pytest.mark.slow
def test_fsdp_trains_a_full_flux_transformer_and_refuses_sd3(tiny_flux_path, tiny_sd3_path, pairs_dir,  # noqa: F811
                                                              tmp_path):
    from diffusers import FluxTransformer2DModel
    from test_scaling import fsdp_config, launch_on_cpu

    launch_on_cpu(tmp_path, fsdp_config(), base_args(tiny_flux_path, pairs_dir, tmp_path / "flux", *COMMON,
                                                     "--train_batch_size", "1"))
    trained = FluxTransformer2DModel.from_pretrained(str(tmp_path / "flux"), subfolder="transformer")
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    assert any(not torch.equal(a, b) for a, b in zip(base.state_dict().values(), trained.state_dict().values()))
    # SD3's persistent pos_embed buffer: accelerate's FSDP2 preparation cannot take it, and the trainer says so
    config = tmp_path / "sd3-fsdp.yaml"
    config.write_text(fsdp_config())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                str(Path(__file__).parent / "accelerate_on_cpu.py"), str(Path(__file__).parents[1] /
                                                                        "train_inversion_dpo.py")]
    result = launch(base_args(tiny_sd3_path, pairs_dir, tmp_path / "sd3", *COMMON, "--train_batch_size", "1"),
                    launcher=launcher, check=False, timeout=300)
    assert result.returncode != 0 and "FSDP2 cannot prepare SD3's transformer" in result.stderr
