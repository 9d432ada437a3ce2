"""Fail fast (pipeline/preflight.py): before any stage, rank 0 reports every problem it can find
cheaply, one line each, exits with status 2 and writes nothing."""
import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO, SMALL, run_torchrun

from pipeline import preflight
from pipeline.config import load_config
from pipeline.data.converters import convert
from pipeline.data.shards import estimated_size
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.runner import planned


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_four_bad_inputs_give_four_lines_and_exit_2_before_any_output(tmp_path):
    """Under 2 processes: a missing dataset folder, weights that are not a weights file, a missing
    DeepSpeed JSON and a global batch that 2 ranks cannot cut into whole chunks."""
    (tmp_path / "weights.bin").write_text("not weights")
    run = tmp_path / "run"
    proc = run_torchrun(2, "stage=all", f"run_dir={run}", "data=cub", f"data.root={tmp_path / 'no_cub'}",
                        f"model.pretrained={tmp_path / 'weights.bin'}", "parallel=zero3",
                        f"parallel.deepspeed_config={tmp_path / 'none.json'}", "train.global_batch=24",
                        "train.chunk_size=8", check=False)
    lines = errors(proc.stderr)
    assert len(lines) == 4, proc.stderr[-3000:]
    for what in ("data.root=", "model.pretrained=", "train.global_batch=24 over 2 processes", "DeepSpeed config"):
        assert sum(what in line for line in lines) == 1, (what, lines)
    assert "exitcode  : 2" in proc.stderr  # every rank ended with the runner's status 2
    assert not run.exists(), "the checks must run before anything is written"


def test_parallel_none_under_two_processes_is_refused_in_one_line(tmp_path):
    """2 processes with a single-process backend: found by the preflight of a finetune, as under torchrun
    (the 2-process refusal of every rank together is test_four_bad_inputs_...'s launch)."""
    cfg = load_config([f"run_dir={tmp_path}", *SMALL])
    found = preflight.problems(cfg, RunDir(cfg.run_dir), 2, ["finetune"])
    assert found == ["2 processes were launched but parallel=none trains in one; launch a single process or set "
                     "parallel=ddp|zero1|zero2|zero3|fsdp2"]
    assert preflight.problems(cfg, RunDir(cfg.run_dir), 2, ["embed"]) == []  # rank 0 embeds; the other waits


def test_a_good_run_dir_and_no_problems_pass(tmp_path):
    cfg = load_config([f"run_dir={tmp_path / 'a' / 'b'}", *SMALL])
    assert preflight.problems(cfg, RunDir(cfg.run_dir), 1, planned(cfg, RunDir(cfg.run_dir))) == []
    assert not (tmp_path / "a").exists()


def test_run_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        preflight.check_run_dir(tmp_path / "file" / "run")


def test_shard_size_estimate_is_close_to_the_shards(digits_run):
    """From 8 images of each split against what the shard stage wrote for all of them."""
    cfg = load_config(["stage=all", *SMALL])
    written = sum(f.stat().st_size for f in (digits_run / "shards").rglob("*") if f.parent.name in ("train", "test"))
    estimate = sum(estimated_size(records, cfg.data.image_size, cfg.data.image_format)[1]
                   for records in convert(cfg.data, cfg.seed).values())
    assert abs(estimate - written) < 0.1 * written, (estimate, written)


def test_too_little_disk_for_the_shards_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**5}))
    with pytest.raises(UserError, match=r"the shards of 1797 images need about .* GB \(estimated\) but .* GB free"):
        preflight.check_data(load_config([]), tmp_path)


def test_only_the_stages_that_will_run_are_checked(digits_run, tmp_path):
    """A complete run plans nothing, so a dataset folder that is gone since does not matter; a changed
    training setting plans finetune and what follows it."""
    rd = RunDir(digits_run)
    assert planned(load_config(["stage=all", *SMALL]), rd) == []
    assert planned(load_config(["stage=all", *SMALL, "train.lr=3e-4"]), rd) == ["finetune", "export", "eval"]
    assert planned(load_config(["stage=embed", *SMALL, "force=true"]), rd) == ["embed"]


@pytest.mark.parametrize("family, make, problem", [
    ("timm", lambda p: p.mkdir(), "is a folder"),
    ("timm", lambda p: p.write_bytes(b"\x00" * 64), "neither a safetensors file nor a torch.save file"),
    ("transformers", lambda p: p.write_text("{}"), "is a file; transformers needs the from_pretrained folder"),
    ("transformers", lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "clip"}'),
                                (p / "model.safetensors").write_text("")), "holds a clip model, not a Dinov2Model"),
])
def test_pretrained_in_the_wrong_format_is_one_line(family, make, problem, tmp_path):
    path = tmp_path / "weights"
    make(path)
    model = "model=dinov2_vitl14_hf" if family == "transformers" else "model=tiny"
    cfg = load_config([model, f"model.pretrained={path}"])
    with pytest.raises(UserError, match=problem):
        preflight.check_pretrained(cfg.model)


def test_real_weights_formats_pass(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "b.pth")
    assert preflight.weights_format(tmp_path / "a.safetensors") == "safetensors"
    assert preflight.weights_format(tmp_path / "b.pth") == "zip"


def test_a_deepspeed_checkpoint_from_elsewhere_needs_trust(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"format": "deepspeed"}))
    with pytest.raises(UserError, match="train.trust_checkpoint=true"):
        preflight.check_foreign_checkpoint(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps({"format": "dcp"}))
    preflight.check_foreign_checkpoint(str(tmp_path / "ckpt"))  # the project's own format: no pickle needed


def test_launch_sh_checks_the_accelerate_yaml_before_starting_anything(tmp_path):
    """slurm/launch.sh, as a job script sources it, with a YAML that is not there: one line, exit 2,
    before it asks Slurm for anything (so no cluster is needed here)."""
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "LAUNCHER": "accelerate",
           "ACCELERATE_CONFIG": str(tmp_path / "none.yaml")}
    proc = subprocess.run(["bash", "-c", 'source slurm/launch.sh; launch parallel=fsdp2 "run_dir=$1"', "job",
                           str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: ACCELERATE_CONFIG={tmp_path / 'none.yaml'} does not exist; give accelerate's YAML (see ds_configs/)"]
    assert not (tmp_path / "run").exists()


def test_eval_export_must_be_a_stage_export_folder(tmp_path):
    """The preflight asks the loader's own question (models.encoders.is_exported): a transformers
    save_pretrained folder also holds model.safetensors and config.json, but not this project's model keys."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 1024}))
    with pytest.raises(UserError, match="is not an exported model") as e:
        preflight.check_export_folder(str(tmp_path))
    assert "\n" not in str(e.value)
