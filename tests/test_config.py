"""Config: presets, overrides, and one-line errors for a user's mistakes."""
import pytest

from conftest import run_pipeline
from pipeline.config import load_config, valid_keys
from pipeline.errors import UserError


def test_defaults_presets_and_overrides():
    cfg = load_config(["train.max_steps=7", "model.embed_dim=16", "data.crop_scale=[0.5,1.0]"])
    assert (cfg.data.name, cfg.model.name, cfg.parallel.name) == ("digits", "tiny", "none")
    assert cfg.train.max_steps == 7 and cfg.model.embed_dim == 16 and cfg.data.crop_scale == [0.5, 1.0]
    assert cfg.model.patch_size == 8 and cfg.data.hflip is False  # from the tiny and digits presets
    assert load_config(["data=imagefolder", "data.root=/x"]).data.root == "/x"


def test_contract_keys_exist():
    for key in ("run_dir", "seed", "train.max_steps", "train.global_batch", "train.chunk_size",
                "train.samples_per_class", "train.checkpoint_every", "data.root"):
        assert key in valid_keys()


@pytest.mark.parametrize("args, message", [
    (["train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'train.max_steps'?"),
    (["data=cubb"], "unknown preset data=cubb"),
    (["train.max_steps=many"], "bad value for 'train.max_steps'"),
    (["stage=finetun"], "did you mean 'finetune'?"),
    (["train.global_batch=30"], "must be a multiple of train.samples_per_class"),
    (["oops"], "is not key=value"),
    (["data.image_format=gif"], "use png, jpg or webp"),
])
def test_bad_config_raises_user_error(args, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(args)


def test_cli_unknown_key_is_one_line_exit_2(tmp_path):
    proc = run_pipeline("stage=eval", f"run_dir={tmp_path}", "train.max_step=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?"
    assert not list(tmp_path.iterdir()), "a rejected command must not write anything"


def test_cli_missing_data_root_is_one_line(tmp_path):
    proc = run_pipeline("stage=shard", f"run_dir={tmp_path / 'run'}", "data=imagefolder", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: data=imagefolder needs data.root=/path/to/imagefolder (the dataset folder)"
    assert "Traceback" not in proc.stderr
    proc = run_pipeline("stage=shard", f"run_dir={tmp_path / 'run'}", "data=imagefolder",
                        f"data.root={tmp_path / 'nowhere'}", check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "shards").exists()
