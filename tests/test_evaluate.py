"""evaluate.py (statistics, scorers, resume) and quick_samples.ipynb, on tiny models built in code."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from tiny_models import save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


def test_win_rate_counts_ties_as_half():
    assert evaluate.wins([1, 2, 3, 4], [2, 2, 1, 5]).tolist() == [1.0, 0.5, 0.0, 1.0]
    mean, low, high = evaluate.mean_with_interval(evaluate.wins([1, 2, 3, 4], [2, 2, 1, 5]))
    assert mean == 0.625 and 0 <= low <= mean <= high <= 1
    assert evaluate.mean_with_interval(np.ones(50)) == (1.0, 1.0, 1.0)  # every resample is all wins
    with pytest.raises(ValueError, match="one base and one tuned score per pair"):
        evaluate.wins([1, 2], [1, 2, 3])


def test_bootstrap_interval_matches_the_normal_approximation():
    # 300 wins in 400 pairs: p = 0.75, standard error sqrt(0.75 * 0.25 / 400) = 0.02165, so the 95% interval is
    # about 0.75 -+ 1.96 * 0.02165 = [0.7076, 0.7924]
    outcomes = np.array([1.0] * 300 + [0.0] * 100)
    mean, low, high = evaluate.mean_with_interval(outcomes, num_resamples=8000, seed=1)
    half_width = 1.96 * math.sqrt(0.75 * 0.25 / 400)
    assert mean == 0.75
    assert low == pytest.approx(0.75 - half_width, abs=0.01)
    assert high == pytest.approx(0.75 + half_width, abs=0.01)


@pytest.fixture(scope="module")
def tuned_folders(sdxl_pipe, tmp_path_factory):
    """A full fine-tune output (unet/) and a LoRA output, as the trainer writes them."""
    return save_tuned_outputs(sdxl_pipe, "unet", tmp_path_factory.mktemp("tuned"), ["to_q", "to_k", "to_v", "to_out.0"])


def save_tuned_outputs(pipe, name, root, lora_targets):
    """root/full/<name>/ (the pipeline's UNet or transformer, perturbed) and root/lora/ (random LoRA B), in the
    trainer's output formats."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(getattr(pipe, name))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "full" / name)
    lora = copy.deepcopy(getattr(pipe, name))
    lora.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=lora_targets))
    with torch.no_grad():
        for parameter_name, p in lora.named_parameters():
            if "lora_B" in parameter_name:
                p.normal_(0, 0.5)
    type(pipe).save_lora_weights(root / "lora", **{f"{name}_lora_layers": get_peft_model_state_dict(lora)})
    return root


def check_tuned_pipelines(base, name, root, **kwargs):
    """Each output under `root` loads onto `base`, changes its samples, and leaves the base's weights alone."""
    model = getattr(base, name)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, output_type="pt", **kwargs)
    base_image = base(**kwargs, generator=torch.Generator().manual_seed(0)).images
    for output in ("full", "lora"):
        tuned = evaluate.tuned_pipeline(base, root / output)
        assert tuned.text_encoder is base.text_encoder and getattr(tuned, name) is not model
        image = tuned(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert not torch.allclose(image, base_image)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base_state.items())


def test_tuned_pipeline_loads_full_and_lora_outputs_without_touching_the_base(sdxl_pipe, tuned_folders):
    check_tuned_pipelines(sdxl_pipe, "unet", tuned_folders)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tuned_pipeline_takes_flow_transformers_full_and_lora(sd3_pipe, flux_pipe, tmp_path, kind):
    base = {"sd3": sd3_pipe, "flux": flux_pipe}[kind]
    save_tuned_outputs(base, "transformer", tmp_path, ["to_q", "to_k", "to_v"])
    check_tuned_pipelines(base, "transformer", tmp_path, max_sequence_length=16)


def test_evaluation_scores_reports_and_resumes(tiny_sdxl_path, tuned_folders, tmp_path):
    clip = save_tiny_clip(str(tmp_path / "clip"))
    head = {f"layers.{i}.weight": torch.randn(o, n) for i, (n, o) in zip((0, 2, 4, 6, 7),
                                                                          [(32, 16), (16, 8), (8, 8), (8, 4), (4, 1)])}
    head.update({k.replace("weight", "bias"): torch.zeros(v.shape[0]) for k, v in list(head.items())})
    from safetensors.torch import save_file

    save_file(head, str(tmp_path / "aesthetic.safetensors"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red square"}\n{"caption": "a blue circle"}\n')
    out = tmp_path / "eval"
    argv = ["--base", tiny_sdxl_path, "--tuned", str(tuned_folders / "full"), "--prompts",
            str(tmp_path / "prompts.jsonl"), "--seeds", "0", "1", "--out_dir", str(out), "--steps", "2",
            "--resolution", "64", "--batch_size", "3", "--device", "cpu", "--dtype", "float32",
            "--scorers", "pickscore", "clip", "aesthetic", "hpsv2", "--pickscore_model", clip,
            "--pickscore_processor", clip, "--clip_model", clip, "--aesthetic_head",
            str(tmp_path / "aesthetic.safetensors"), "--aesthetic_clip_model", clip, "--bootstrap", "200"]
    evaluate.main(evaluate.parse_args(argv))
    report = json.loads((out / "report.json").read_text())
    assert report["pairs"] == 4 and set(report["scorers"]) == {"pickscore", "clip", "aesthetic"}
    assert "hpsv2 is not installed" in report["skipped_scorers"]["hpsv2"]
    for entry in report["scorers"].values():
        mean, low, high = entry["win_rate"]
        assert 0 <= low <= mean <= high <= 1
    assert "| pickscore |" in (out / "report.md").read_text()
    assert Image.open(out / "grid.png").size == (64 * 4, 64 * 2)  # the 4 prompt-seed pairs; base row, tuned row
    # the report's base mean is the mean of the scorer over the saved base images, scored in the report's batches of
    # 3 (a CLIP call on another batch, padded to another length, rounds differently, by an amount that depends on the
    # CPU's kernels), so the same numbers
    scorer = evaluate.ClipScorer(clip, clip, "cpu")
    jobs = [(0, "a red square", 0), (0, "a red square", 1), (1, "a blue circle", 0), (1, "a blue circle", 1)]
    images = [Image.open(out / "images" / "base" / evaluate.image_name(job)).convert("RGB") for job in jobs]
    prompts = [prompt for _, prompt, _ in jobs]
    expected = np.concatenate([scorer(images[:3], prompts[:3]), scorer(images[3:], prompts[3:])]).astype(float).mean()
    assert report["scorers"]["pickscore"]["base_mean"][0] == float(expected)

    # resume: nothing is generated again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert len(stamps) == 8
    evaluate.main(evaluate.parse_args(argv))
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps


def test_a_scorer_that_cannot_run_is_reported_not_fatal():
    args = evaluate.parse_args(["--base", "b", "--tuned", "t", "--prompts", "p.txt", "--scorers", "aesthetic",
                                "imagereward"])
    scorers, skipped = evaluate.scorers_from_args(args, "cpu")
    assert scorers == {}
    assert "--aesthetic_head" in skipped["aesthetic"]
    assert "ImageReward is not installed" in skipped["imagereward"]


def run_notebook(base, trained, tmp_path, name):
    """Run quick_samples.ipynb headless with its parameters cell pointed at tiny models; returns its printed text."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "quick_samples.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    clip = save_tiny_clip(str(tmp_path / "clip"))
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    parameters.source = "\n".join([
        "import torch",
        f"BASE_MODEL = {base!r}",
        f"TRAINED = {str(trained)!r}",
        'PROMPTS = ["a red square", "a blue circle"]',
        "SEEDS = [0, 1]",
        "GUIDANCE_SCALE = 5.0",
        "STEPS = 2",
        "RESOLUTION = 64",
        'DEVICE = "cpu"',
        "DTYPE = torch.float32",
        f"GRID_PATH = {str(tmp_path / f'grid-{name}.png')!r}",
        "SCORE = True",
        f"PICKSCORE_MODEL = {clip!r}",
        f"PICKSCORE_PROCESSOR = {clip!r}",
    ])
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert Image.open(tmp_path / f"grid-{name}.png").size == (64 * 4, 64 * 2)
    return "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_quick_samples_notebook_runs_headless(tiny_sdxl_path, tuned_folders, tmp_path):
    for kind in ("full", "lora"):
        assert "PickScore base" in run_notebook(tiny_sdxl_path, tuned_folders / kind, tmp_path, kind)


def test_quick_samples_notebook_takes_a_flux_base_and_trained_transformer(tiny_flux_path, flux_pipe, tmp_path):
    save_tuned_outputs(flux_pipe, "transformer", tmp_path, ["to_q", "to_k", "to_v"])
    assert "PickScore base" in run_notebook(tiny_flux_path, tmp_path / "full", tmp_path, "flux")
