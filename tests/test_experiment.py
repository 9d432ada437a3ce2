"""A run directory is an experiment (issue 22): later commands start from its saved settings, may not
swap its data or model under a finished stage, and every setting can be seen with its source."""
import hashlib
import json
import shutil

import pytest
from conftest import SMALL, run_pipeline
from omegaconf import OmegaConf
from test_validation import image_folder

from pipeline.config.loader import resolve
from pipeline.train.optim import resolve_epochs


def digest(folder) -> dict[str, str]:
    """Every file under `folder` (symlinks as their targets' names) -> its sha256."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path.relative_to(folder))] = "-> " + str(path.readlink())
        elif path.is_file():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A finished stage=all on an image folder, with a best checkpoint."""
    root = tmp_path_factory.mktemp("custom")
    image_folder(root / "images", classes=12, per_class=6)
    run = root / "run"
    run_pipeline("stage=all", f"run_dir={run}", "data=imagefolder", f"data.root={root / 'images'}",
                 "data.image_size=16", "data.workers=0", "data.shard_workers=0", *SMALL, "train.global_batch=16", "train.chunk_size=8", "train.val_every=3")
    return run


def test_a_later_command_that_omits_the_data_evaluates_the_runs_own(custom_run, tmp_path):
    """The data-loss report: an eval on a copied custom-data run, with no data= or model= given, used
    to reshard digits over the run's shards and drop checkpoints/best."""
    run = tmp_path / "copy"
    shutil.copytree(custom_run, run, symlinks=True)
    shards, checkpoints = digest(run / "shards"), digest(run / "checkpoints")
    run_pipeline("stage=eval", f"run_dir={run}", "eval.models=[checkpoint]", "eval.checkpoint=best")
    assert digest(run / "shards") == shards and digest(run / "checkpoints") == checkpoints
    assert json.loads((run / "shards" / "summary.json").read_text())["dataset"] == "imagefolder"
    assert set(json.loads((run / "eval" / "metrics.json").read_text())) == {"checkpoint"}
    assert OmegaConf.load(run / "config.yaml").data.name == "imagefolder"


def test_a_changed_data_setting_on_a_finished_run_is_refused(custom_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(custom_run, run, symlinks=True)
    before = digest(run)
    proc = run_pipeline("stage=eval", f"run_dir={run}", "data=digits", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data.name=digits would change the finished shard stage of {run} (made with data.name=imagefolder); "
        "to redo it and the stages after it add force=true, or use a new run_dir"]
    assert digest(run) == before


def test_max_steps_on_the_command_line_beats_a_recipes_epochs():
    """recipe=ibc sets train.epochs (70); train.max_steps=5 given with it trains 5 steps, and says so."""
    resolved = resolve(["recipe=ibc", "train.max_steps=5"])
    t = resolved.config.train
    assert (t.max_steps, t.epochs) == (5, None)
    assert resolved.notes == ["train.max_steps=5 from the command line wins over train.epochs=70 (from recipe=ibc)"]
    assert resolve_epochs(t, 10_000)[0].max_steps == 5
    assert resolve(["recipe=ibc"]).config.train.epochs == 70
    both = resolve(["recipe=ibc", "train.max_steps=5", "train.epochs=3"])  # the later one wins
    assert (both.config.train.epochs, both.notes) == (3, ["train.epochs=3 given after train.max_steps=5 decides the steps"])
    assert resolve(["recipe=ibc", "train.epochs=3", "train.max_steps=5"]).config.train.epochs is None


def test_stage_config_shows_each_values_source_and_runs_nothing(tmp_path):
    run = tmp_path / "run"
    proc = run_pipeline("stage=config", f"run_dir={run}", "recipe=rsk", "train.lr=0.5", check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "train.lr: 0.5    # command line" in lines
    assert "train.samples_per_class: 4    # recipe=rsk" in lines and "data.name: digits    # preset data=digits" in lines
    assert "train.max_steps: 200" in lines  # a default: no source shown
    assert lines[-1] == "# checks: passed; stage=config ran nothing"
    assert not run.exists()


def test_stage_config_on_a_run_names_where_each_value_was_first_set(custom_run):
    proc = run_pipeline("stage=config", f"run_dir={custom_run}", "eval.nmi=false")
    assert "data.name: imagefolder    # preset data=imagefolder" in proc.stdout.splitlines()
    assert "data.image_size: 16    # command line" in proc.stdout.splitlines()
    assert "eval.nmi: False    # command line (stage=config)" in proc.stdout.splitlines()


def test_sources_last_and_per_command_settings_are_not_saved(tmp_path):
    """The first command's sources survive later commands (which used to relabel every key 'run_dir');
    a search's images and port are not saved, and the run's export.onnx is what its export set."""
    from pipeline.config.experiment import describe
    from pipeline.config.loader import save

    run = tmp_path / "run"
    run.mkdir()
    save(resolve(["stage=all", f"run_dir={run}", "data=digits", "train.lr=0.5"], run_dir=run), run)
    save(resolve(["stage=export", f"run_dir={run}", "export.onnx=true"], run_dir=run), run)
    search = resolve(["stage=search", f"run_dir={run}", "search.images=q.png", "serve.port=9", "force=true",
                      "plan.gpu=A100-40GB"], run_dir=run)
    assert search.config.export.onnx and search.config.search.images == "q.png"
    save(search, run)
    saved = OmegaConf.load(run / "config.yaml")
    assert (saved.search.images, saved.serve.port, saved.plan.gpu, saved.force) == (None, 8080, "H100-80GB", False)
    shown = resolve(["stage=config", f"run_dir={run}"], run_dir=run)
    lines = describe(shown).splitlines()
    assert "train.lr: 0.5    # command line" in lines
    assert "data.name: digits    # preset data=digits" in lines
    assert "export.onnx: True    # command line (stage=export)" in lines  # unchanged by the search
    assert "search.images: None" in lines and "serve.port: 8080" in lines and "plan.gpu: H100-80GB" in lines
    assert not shown.config.force
    later = resolve(["stage=export", f"run_dir={run}", "export.onnx=false"], run_dir=run)
    assert "export.onnx: False    # command line (stage=export)" in describe(later).splitlines()
    assert later.sources["train.lr"] == "command line"


def test_epochs_become_steps_before_the_stages_are_fingerprinted(custom_run):
    """Issue 34: train.epochs is turned into train.max_steps where the config is resolved, from the run's
    training shards (and the sampler's epochs), so stage=config shows the steps that will run."""
    train_images = json.loads((custom_run / "shards" / "summary.json").read_text())["splits"]["train"]["images"]
    proc = run_pipeline("stage=config", f"run_dir={custom_run}", "train.epochs=3")
    steps = 3 * max(1, train_images // 16)  # train.global_batch=16, the P x K sampler's fixed epochs
    assert f"train.max_steps: {steps}    # train.epochs=3 over {custom_run / 'shards' / 'train'}" in proc.stdout.splitlines()


def test_a_checkpoint_typo_is_found_before_any_work(tmp_path):
    run = tmp_path / "run"
    proc = run_pipeline("stage=eval", f"run_dir={run}", "eval.models=[checkpoint]", "eval.checkpoint=bestt",
                        check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: eval.checkpoint=bestt is neither latest, best, step_<N> nor a checkpoint "
                                   "folder; did you mean 'best'?")
    assert not run.exists()


def test_a_mistyped_run_dir_is_refused_with_the_closest_and_nothing_is_made(tmp_path, capsys):
    """stage=search on runs/my_shape (one letter missing) used to shard the digits and train the demo."""
    from pipeline import runner
    (tmp_path / "runs" / "my_shapes").mkdir(parents=True)
    (tmp_path / "runs" / "other").mkdir()
    typo = tmp_path / "runs" / "my_shape"
    for stage in ("eval", "index", "search", "serve"):
        assert runner.main([f"stage={stage}", f"run_dir={typo}"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: run_dir={typo} does not exist, and stage={stage} reads a finished model; did you mean "
            f"run_dir={tmp_path / 'runs' / 'my_shapes'}? to start a new run use stage=all (or stage=finetune) "
            f"run_dir={typo}"]
    assert not typo.exists() and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["my_shapes", "other"]
    assert runner.main(["stage=eval", f"run_dir={tmp_path / 'nowhere' / 'run'}"]) == 2  # no parent: no suggestion
    assert "does not exist, and stage=eval reads a finished model; to start a new run" in capsys.readouterr().err


def test_only_stages_that_read_this_runs_model_need_its_directory(tmp_path):
    from pipeline.config.experiment import check_run_exists
    new = tmp_path / "new"
    for args in (["stage=finetune"], ["stage=all"], ["stage=embed"], ["stage=export"], ["stage=eval", "eval.models=[frozen]"],
                 ["stage=eval", "eval.models=[finetuned]", f"eval.export={tmp_path}"],
                 ["stage=index", f"index.checkpoint={tmp_path}"]):
        check_run_exists(resolve([*args, f"run_dir={new}"]).config)  # none refused
    check_run_exists(resolve(["stage=eval", f"run_dir={tmp_path}"]).config)  # it exists: prerequisites run as today
    with pytest.raises(Exception, match="does not exist"):
        check_run_exists(resolve(["stage=eval", "eval.models=[checkpoint]", "eval.checkpoint=best", f"run_dir={new}"]).config)
