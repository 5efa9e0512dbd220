"""Runs that cannot be mixed up (runs.py and the trainer's use of it): the settings that define a run, one run per
output folder, the run history, checkpoints checked against their records, and exactly the steps asked for."""

import json
import logging
import shutil
from argparse import Namespace
from pathlib import Path

import pytest

import runs
from test_train import base_args, launch, pairs_dir, read_metrics  # noqa: F401  (pairs_dir: a fixture)

# ---------------------------------------------------------------------------------------------------------------
# runs.py on its own
# ---------------------------------------------------------------------------------------------------------------


def test_every_trainer_flag_either_defines_the_run_or_may_change_on_resume():
    from train_inversion_dpo import build_parser

    flags = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert not set(runs.RUN_DEFINING) & set(runs.RESUMABLE)
    assert flags == set(runs.RUN_DEFINING) | set(runs.RESUMABLE)


def test_help_lists_the_settings_that_may_change_on_resume():
    from train_inversion_dpo import build_parser

    text = " ".join(build_parser().format_help().split())
    listed = text.split("Without it, only these may change on resume:")[1]
    for flag in ("--learning_rate", "--max_train_steps", "--checkpointing_steps", "--report_to",
                 "--validation_prompts"):
        assert flag in listed
    assert "--loss_type" not in listed.split(". ")[0]


def settings(**changes):
    base = {name: None for name in runs.RUN_DEFINING}
    base.update(pretrained_model_name_or_path="/models/a", loss_type="inversion_dpo_x0", num_inference_steps=4,
                model_fingerprint="f1", dataset_size=8, num_processes=1, distributed_type="NO")
    base.update(changes)
    return base


def test_setting_changes_names_each_difference_and_lets_a_moved_model_with_the_same_fingerprint_pass():
    assert runs.setting_changes(settings(), settings()) == []
    assert runs.setting_changes(settings(), settings(loss_type="diffusion_dpo", num_inference_steps=6)) == [
        ("loss_type", "inversion_dpo_x0", "diffusion_dpo"), ("num_inference_steps", 4, 6)]
    # the same files under another path: the same model
    assert runs.setting_changes(settings(), settings(pretrained_model_name_or_path="/disk2/a")) == []
    # another model: the path and the fingerprint both differ
    assert [name for name, _, _ in runs.setting_changes(
        settings(), settings(pretrained_model_name_or_path="/models/b", model_fingerprint="f2"))] == [
        "model_fingerprint", "pretrained_model_name_or_path"]
    # a fingerprint unknown on one side (a hub model not yet cached) falls back to the name
    assert runs.setting_changes(settings(), settings(model_fingerprint=None)) == []
    assert [name for name, _, _ in runs.setting_changes(
        settings(), settings(model_fingerprint=None, pretrained_model_name_or_path="/models/b"))] == [
        "pretrained_model_name_or_path"]
    described = runs.describe_changes([("num_processes", 1, 2)])
    assert described == "num_processes: 1 in the checkpoint, 2 now"


def test_a_restart_without_a_checkpoint_is_checked_against_the_runs_last_start(tmp_path, caplog):
    history = [runs.start_record(1, settings(), [], 0, None, "cpu", {}), runs.end_record(1, 3),
               runs.start_record(2, settings(seed=5), [("seed", None, 5)], 3, "checkpoint-3", "cpu", {})]
    assert runs.recorded_settings(None, []) == (None, None)
    recorded, where = runs.recorded_settings(None, history)
    assert recorded == settings(seed=5) and where == "the run's last start"
    assert runs.check_settings(recorded, settings(seed=5), where, tmp_path, allowed=False) == []
    with pytest.raises(ValueError, match="seed: 5 in the run's last start, 6 now"):
        runs.check_settings(recorded, settings(seed=6), where, tmp_path, allowed=False)
    with caplog.at_level(logging.WARNING, logger="train_inversion_dpo"):
        assert runs.check_settings(recorded, settings(seed=6), where, tmp_path, allowed=True) == [("seed", 5, 6)]
    assert "seed changes from 5 (in the run's last start) to 6" in caplog.text
    assert runs.ended_at(history) is None and runs.ended_at(history[:2]) == 3 and runs.starts(history)[1]["start"] == 2


def write_files(folder, files):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_a_checkpoint_record_holds_each_files_size_and_hash_and_finds_every_kind_of_damage(tmp_path):
    import hashlib

    folder = tmp_path / "checkpoint-3"
    write_files(folder, {"optimizer.bin": b"o" * 100, "unet/weights.safetensors": b"w" * 1000})
    runs.write_checkpoint_record(folder, 3, {"loss_type": "x"})
    record = runs.read_checkpoint_record(folder)
    assert record["global_step"] == 3 and record["settings"] == {"loss_type": "x"}
    assert record["files"]["unet/weights.safetensors"] == {"size": 1000,
                                                           "sha256": hashlib.sha256(b"w" * 1000).hexdigest()}
    assert runs.checkpoint_problems(folder) == []
    # cut short, as a full disk leaves it
    (folder / "unet/weights.safetensors").write_bytes(b"w" * 10)
    assert runs.checkpoint_problems(folder) == ["unet/weights.safetensors has 10 bytes, 1000 were written"]
    # the same size, other bytes
    (folder / "unet/weights.safetensors").write_bytes(b"w" * 999 + b"x")
    assert runs.checkpoint_problems(folder) == [
        "unet/weights.safetensors has other contents than were written (sha256 differs)"]
    (folder / "optimizer.bin").unlink()
    assert "optimizer.bin is missing" in runs.checkpoint_problems(folder)
    # a record written before files were recorded cannot be checked: intact, as before
    (folder / runs.CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": 3}))
    assert runs.checkpoint_problems(folder) == []
    (folder / runs.CHECKPOINT_COMPLETE).write_text("{not json")
    assert runs.checkpoint_problems(folder)[0].startswith(f"{runs.CHECKPOINT_COMPLETE} unreadable")


def test_latest_falls_back_to_the_newest_intact_checkpoint_and_a_named_damaged_one_is_refused(tmp_path, caplog):
    for step in (1, 2, 10):
        write_files(tmp_path / f"checkpoint-{step}", {"model.bin": bytes([step]) * 64})
        runs.write_checkpoint_record(tmp_path / f"checkpoint-{step}", step, {})
    (tmp_path / "checkpoint-11").mkdir()  # a save that never finished: no record
    assert runs.resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"  # numeric order, not text
    (tmp_path / "checkpoint-10" / "model.bin").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="train_inversion_dpo"):
        assert runs.resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert "checkpoint-10 is damaged (model.bin has 0 bytes, 64 were written)" in caplog.text
    assert "checkpoint-11: its save did not finish" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-10 is damaged: model.bin has 0 bytes"):
        runs.resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-10"))
    with pytest.raises(ValueError, match="not a completed checkpoint folder"):
        runs.resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-11"))
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}" / "model.bin").unlink()
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        runs.resume_checkpoint(tmp_path, "latest")
    assert runs.resume_checkpoint(tmp_path / "empty", "latest") is None


def test_the_model_fingerprint_follows_the_files_not_their_folder(tmp_path):
    model = tmp_path / "model"
    write_files(model, {"model_index.json": b'{"a": 1}', "unet/config.json": b"{}",
                        "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 40000})
    print_ = runs.model_fingerprint(model)
    shutil.copytree(model, tmp_path / "copy")
    assert runs.model_fingerprint(tmp_path / "copy") == print_
    (tmp_path / "copy" / "unet/config.json").write_bytes(b'{"x": 2}')
    assert runs.model_fingerprint(tmp_path / "copy") != print_
    weights = bytearray((model / "unet/diffusion_pytorch_model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 1  # one bit in the middle of the weights
    (model / "unet/diffusion_pytorch_model.safetensors").write_bytes(bytes(weights))
    assert runs.model_fingerprint(model) != print_
    assert runs.model_fingerprint("no-such-org/no-such-model") is None  # not in the local hub cache


def test_records_leave_the_hub_token_out():
    args = Namespace(hub_token="hf_secret", learning_rate=1e-4)
    assert runs.recorded_flags(args) == {"hub_token": "<not recorded>", "learning_rate": 1e-4}
    assert runs.recorded_command(["x.py", "--hub_token", "hf_secret", "--hub_token=hf_secret", "--seed", "0"]) == [
        "x.py", "--hub_token", "<not recorded>", "--hub_token=<not recorded>", "--seed", "0"]


def test_clearing_a_run_removes_what_a_run_writes_and_nothing_else(tmp_path):
    write_files(tmp_path, {"checkpoint-2/model.bin": b"1", "metrics.jsonl": b"{}", "run_history.jsonl": b"{}",
                           "unet/config.json": b"{}", "logs/events": b"1", "my_notes.txt": b"mine",
                           "data/pairs.jsonl": b"{}"})
    assert [entry.name for entry in runs.run_entries(tmp_path)] == ["checkpoint-2", "metrics.jsonl",
                                                                     "run_history.jsonl", "unet"]
    runs.clear_run(tmp_path, "logs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "my_notes.txt"]
    assert runs.run_entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# The trainer, on the tiny SDXL (each row of the table of the issue that asked for this)
# ---------------------------------------------------------------------------------------------------------------


def history(output_dir):
    return runs.read_history(output_dir)


def snapshot(output_dir):
    """Every file's bytes under output_dir."""
    return {p.relative_to(output_dir).as_posix(): p.read_bytes() for p in Path(output_dir).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_resuming_trains_exactly_the_steps_asked_for_and_refuses_changed_settings(tiny_sdxl_path, pairs_dir, tmp_path):
    out = tmp_path / "run"

    def train(*extra, check=True, processes=1):
        return launch(base_args(tiny_sdxl_path, pairs_dir, out, "--checkpointing_steps", "1", *extra),
                      check=check, processes=processes)

    # from step 0: exactly --max_train_steps steps
    train()
    assert [row["step"] for row in read_metrics(out)] == [1, 2]
    assert [row["start"] for row in read_metrics(out)] == [1, 1]
    config = (out / runs.CONFIG_FILE).read_bytes()
    first = history(out)
    assert [record.get("start") or record.get("end") for record in first] == [1, 1]
    assert first[0]["start_step"] == 0 and first[0]["resumed_from"] is None and first[1]["step"] == 2
    assert first[0]["settings"]["loss_type"] == "inversion_dpo_x0" and first[0]["settings"]["dataset_size"] == 8
    assert first[0]["settings"]["num_processes"] == 1 and first[0]["settings"]["model_fingerprint"]
    assert first[0]["libraries"]["torch"] and first[0]["device"].startswith("cpu")
    settings = runs.read_checkpoint_record(out / "checkpoint-2")["settings"]
    assert settings == first[0]["settings"]

    # at the end: the same command resumed trains nothing and rewrites nothing
    before = snapshot(out)
    result = train("--resume_from_checkpoint", "latest")
    assert "nothing to train: the run in" in result.stderr and "is at step 2" in result.stderr
    assert snapshot(out) == before

    # settings that define the run changed: stopped before any model loads, each change named, nothing written
    result = train("--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--loss_type", "diffusion_dpo",
                   "--num_inference_steps", "6", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "loss_type: 'inversion_dpo_x0' in the checkpoint, 'diffusion_dpo' now" in result.stderr
    assert "num_inference_steps: 3 in the checkpoint, 6 now" in result.stderr
    assert "--allow_changed_settings" in result.stderr
    assert snapshot(out) == before
    # two processes resuming a one-process run: every process stops with the same message, none hangs
    result = launch(base_args(tiny_sdxl_path, pairs_dir, out, "--checkpointing_steps", "1", "--resume_from_checkpoint",
                              "latest", "--max_train_steps", "3"), check=False, processes=2)
    assert result.returncode != 0
    assert result.stderr.count("num_processes: 1 in the checkpoint, 2 now") == 2
    assert snapshot(out) == before

    # in between: one more step, a new start; a learning rate may change on resume
    train("--resume_from_checkpoint", "latest", "--max_train_steps", "3", "--learning_rate", "2e-5")
    assert [(row["step"], row["start"]) for row in read_metrics(out)] == [(1, 1), (2, 1), (3, 2)]
    second = history(out)[2]
    assert second["start"] == 2 and second["start_step"] == 2 and second["resumed_from"].endswith("checkpoint-2")
    assert second["changed"] == [] and second["flags"]["learning_rate"] == 2e-5
    assert (out / runs.CONFIG_FILE).read_bytes() == config  # the first start's flags, never overwritten

    # an intended change: logged, recorded in the history, and in the checkpoints written after it
    result = train("--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--num_inference_steps", "4",
                   "--allow_changed_settings")
    assert "num_inference_steps changes from 3" in result.stderr
    third = [record for record in history(out) if "start" in record][-1]
    assert third["changed"] == [{"setting": "num_inference_steps", "checkpoint": 3, "now": 4}]
    assert runs.read_checkpoint_record(out / "checkpoint-4")["settings"]["num_inference_steps"] == 4
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_one_run_per_output_folder_and_damaged_checkpoints(tiny_sdxl_path, pairs_dir, tmp_path):
    out = tmp_path / "run"
    launch(base_args(tiny_sdxl_path, pairs_dir, out, "--checkpointing_steps", "1", "--max_train_steps", "3"))
    (out / "notes.txt").write_text("mine")

    # a new run into the folder: stopped, told how to resume it or where else to go
    before = snapshot(out)
    result = launch(base_args(tiny_sdxl_path, pairs_dir, out, "--loss_type", "diffusion_dpo"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "holds a run already" in result.stderr and "checkpoint-3" in result.stderr
    assert "--resume_from_checkpoint latest" in result.stderr and "--overwrite_output_dir" in result.stderr
    assert snapshot(out) == before

    # the newest checkpoint cut short: latest resumes from the newest intact one and says so
    weights = out / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = launch(base_args(tiny_sdxl_path, pairs_dir, tmp_path / "other", "--resume_from_checkpoint",
                              str(out / "checkpoint-3")), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "checkpoint-3 is damaged: unet/diffusion_pytorch_model.safetensors has 1000 bytes" in result.stderr
    result = launch(base_args(tiny_sdxl_path, pairs_dir, out, "--checkpointing_steps", "1", "--max_train_steps", "4",
                              "--resume_from_checkpoint", "latest"))
    assert "checkpoint-3 is damaged" in result.stderr and "resuming from" in result.stderr
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 3, 4]  # step 3 again, from checkpoint-2
    assert runs.checkpoint_problems(out / "checkpoint-3") == []  # written anew

    # --overwrite_output_dir: the old run's files go first, the user's stay
    launch(base_args(tiny_sdxl_path, pairs_dir, out, "--loss_type", "diffusion_dpo", "--overwrite_output_dir",
                     "--max_train_steps", "1", "--checkpointing_steps", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [row["step"] for row in read_metrics(out)] == [1]
    assert [record.get("start") for record in history(out)][0] == 1
    assert json.loads((out / runs.CONFIG_FILE).read_text())["loss_type"] == "diffusion_dpo"
    assert (out / "notes.txt").read_text() == "mine"
