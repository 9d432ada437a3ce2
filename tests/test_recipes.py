"""recipe=<rsk|roth|ibc>: each recipe's resolved config per dataset equals the values read off the
authors' files (written out here, independently of the YAML), and recipes compose with data=,
model=, loss= and key=value as the contract says."""
import json

import numpy as np
import pytest
import torch
from conftest import SMALL, run_pipeline
from PIL import Image

from pipeline.config import GROUPS, Config, load_config, presets, valid_keys
from pipeline.config.recipe import load, names
from pipeline.data.epoch_rules import build_sampler
from pipeline.data.shards import ShardIndex
from pipeline.parallel import checkpoint
from pipeline.parallel.shares import check_shares
from pipeline.errors import UserError
from pipeline.models.encoders import build_encoder
from pipeline.train.optim import build_optimizer

# RecallatK_surrogate src/main.py, ViTB16 branches; README.md command; src/losses.py; src/datasets.py; src/netlib.py.
RSK_ALL = {"train.samples_per_class": 4, "train.optimizer": "adamw", "train.weight_decay": 0.0004,
           "train.decay_norms_biases": True, "train.head_lr": None, "train.schedule": "step", "train.gamma": 0.3,
           "train.warmup_steps": 0, "train.ks": [1, 2, 4, 8, 16], "train.tau_rank": 0.01, "train.tau_count": 1.0,
           "train.include_query_in_rank": True, "train.small_classes": "skip", "model.embed_dim": 512,
           "model.head_norm": True, "model.drop_path": 0.0, "loss.name": "rsk"}
RSK_VIEWS = {"data.crop_scale": [0.08, 1.0], "data.hflip": True, "data.eval_resize": 256}
RSK = {
    "cub": {"train.global_batch": 400, "train.lr": 1e-5, "train.epochs": 40, "train.milestones": [10, 20, 30]},
    "cars": {"train.global_batch": 392, "train.lr": 1e-5, "train.epochs": 50, "train.milestones": [20, 30, 40]},
    "sop": {"train.global_batch": 4000, "train.lr": 5e-5, "train.epochs": 55, "train.milestones": [25, 50]},
    "inat": {"train.global_batch": 4000, "train.lr": 5e-5, "train.epochs": 90, "train.milestones": [10, 40, 70]},
    "vehicleid": {"train.global_batch": 4000, "train.lr": 5e-5, "train.epochs": 90, "train.milestones": [40, 70]},
}

# Revisiting_Deep_Metric_Learning_PyTorch parameters.py, main.py, Sample_Runs/ICML2020_RevisitDML_SampleRuns.sh.
ROTH_ALL = {"train.global_batch": 112, "train.samples_per_class": 2, "train.optimizer": "adam", "train.lr": 1e-5,
            "train.head_lr": None, "train.weight_decay": 0.0004, "train.decay_norms_biases": True,
            "train.schedule": "step", "train.milestones": [1000], "train.gamma": 0.3, "train.warmup_steps": 0,
            "train.small_classes": "repeat", "model.embed_dim": 128, "model.head_norm": False}
ROTH_VIEWS = {"data.crop_scale": [0.08, 1.0], "data.hflip": True, "data.eval_resize": 256}
ROTH = {"cub": {"train.epochs": 150}, "cars": {"train.epochs": 150}, "sop": {"train.epochs": 100}}
ROTH_LOSSES = {
    "margin": {"loss.name": "margin", "loss.margin": 0.2, "loss.beta": 1.2, "loss.lr": 0.0005, "loss.weight_decay": 0.0,
               "loss.miner": "distance", "loss.p_switch": 0.0},
    "triplet": {"loss.name": "triplet", "loss.margin": 0.2, "loss.miner": "distance", "loss.distance_power": 2,
                "loss.reduction": "mean", "loss.p_switch": 0.0},
    "contrastive": {"loss.name": "contrastive", "loss.margin": 1.0, "loss.miner": "distance", "loss.reduction": "mean"},
    "multi_similarity": {"loss.beta": 40.0, "loss.margin": 0.1},
    "normalized_softmax": {"loss.temperature": 0.05, "loss.lr": 1e-5, "loss.weight_decay": 0.0},
    "arcface": {"loss.margin": 28.64788975654116, "loss.scale": 16.0, "loss.lr": 0.0005, "loss.weight_decay": 0.0},
}
ROTH_RHO = {("margin_rho", "cub"): 0.35, ("margin_rho", "cars"): 0.35, ("margin_rho", "sop"): 0.15,
            ("triplet_rho", "cub"): 0.4, ("triplet_rho", "cars"): 0.35, ("triplet_rho", "sop"): 0.15,
            ("contrastive_rho", "cub"): 0.4, ("contrastive_rho", "cars"): 0.35, ("contrastive_rho", "sop"): 0.15}

# intra_batch trainer.py, net/*, dataset/utils.py, config/config_<dataset>_train.yaml.
IBC_ALL = {"train.optimizer": "radam", "train.head_lr": None, "train.decay_norms_biases": True,
           "train.schedule": "step", "train.milestones": [30], "train.gamma": 0.1, "train.warmup_steps": 0,
           "train.epochs": 70, "train.small_classes": "repeat", "model.embed_dim": 512, "model.head_norm": False,
           "loss.name": "mpn", "loss.label_smoothing": 0.1, "loss.mpn_dropout": 0.1, "loss.weight_decay": None}
IBC_VIEWS = {"data.crop_scale": [0.08, 1.0], "data.hflip": True, "data.random_erasing": 0.5, "data.eval_resize": 256}
IBC = {
    "cub": (54, 9, 0.0001563663718906821, 6.059722614369727e-06, 1, 2, False, 0.2),
    "cars": (70, 7, 0.00036683239911604993, 2.551918610962277e-09, 2, 8, True, 0.1111111111111),
    "sop": (90, 6, 0.0002472471515853406, 2.7650277063275255e-13, 0, 8, False, 0.6046908988578005),
    "inshop": (56, 4, 0.00011265974954242144, 1.0554824926510768e-07, 1, 4, False, 0.18591347176280537),
}


def resolved(*args: str) -> dict:
    cfg = load_config(list(args))
    return {key: value for key in valid_keys() if "." in key
            for value in [getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])]}


def same(got, want) -> bool:
    """Equal values: numbers to 12 digits (milestones are floats: epochs may be fractions), the rest exactly."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == pytest.approx(want, rel=1e-12)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def check(args: list[str], expected: dict) -> None:
    got = resolved(*args)
    wrong = {k: (got[k], v) for k, v in expected.items() if not same(got[k], v)}
    assert not wrong, f"{' '.join(args)}: (resolved, expected) {wrong}"


@pytest.mark.parametrize("data", sorted(RSK))
def test_rsk(data):
    check(["recipe=rsk", f"data={data}", "model=vitl14_clip"], {**RSK_ALL, **RSK_VIEWS, **RSK[data]})


@pytest.mark.parametrize("data", sorted(ROTH))
@pytest.mark.parametrize("loss", sorted(ROTH_LOSSES))
def test_roth(data, loss):
    sop_softmax = {"loss.lr": 0.002} if (loss, data) == ("normalized_softmax", "sop") else {}   # SampleRuns:395
    check(["recipe=roth", f"data={data}", f"loss={loss}", "model=dinov2_vitl14"],
          {**ROTH_ALL, **ROTH_VIEWS, **ROTH[data], **ROTH_LOSSES[loss], **sop_softmax})


def test_roth_defaults_to_the_margin_loss_and_sets_rho_per_dataset():
    check(["recipe=roth", "data=cub"], ROTH_LOSSES["margin"])
    for (loss, data), p in ROTH_RHO.items():
        base = loss.removesuffix("_rho")
        check(["recipe=roth", f"data={data}", f"loss={loss}"], {**ROTH_LOSSES[base], "loss.p_switch": p})
    check(["recipe=roth", "data=sop", "loss=normalized_softmax"], {"loss.lr": 0.002})


@pytest.mark.parametrize("data", sorted(IBC))
def test_ibc(data):
    batch, k, lr, wd, layers, heads, concat, temperature = IBC[data]
    check(["recipe=ibc", f"data={data}", "model=vitl14_clip"],
          {**IBC_ALL, **IBC_VIEWS, "train.global_batch": batch, "train.samples_per_class": k, "train.lr": lr,
           "train.weight_decay": wd, "loss.lr": lr, "loss.mpn_layers": layers, "loss.mpn_heads": heads,
           "loss.mpn_concat": concat, "loss.temperature": temperature})


def test_no_recipe_keeps_the_projects_defaults():
    """The Quick start's settings do not move: no recipe is the defaults and the presets, as before."""
    assert load_config([]) == load_config(["recipe=none"])
    check([], {"train.optimizer": "adamw", "train.schedule": "cosine", "train.lr": 1e-4, "train.head_lr": 1e-3,
               "train.weight_decay": 0.05, "train.decay_norms_biases": False, "train.warmup_steps": 10,
               "train.max_steps": 200, "train.epochs": None, "train.global_batch": 128, "train.small_classes": "repeat",
               "train.include_query_in_rank": False, "data.eval_resize": None, "data.random_erasing": 0.0,
               "loss.name": "rsk", "model.embed_dim": 128})
    assert load_config([]).recipe == "none" and load_config(["recipe=rsk"]).recipe == "rsk"


def test_precedence():
    # key=value wins over the recipe, wherever it is on the line.
    check(["train.lr=0.5", "recipe=rsk", "data=cub"], {"train.lr": 0.5, "train.global_batch": 400})
    # loss= on the command line wins over the recipe's loss, and gets the recipe's settings for it.
    check(["recipe=rsk", "data=sop", "loss=rsk_simix"], {"loss.name": "rsk_simix", "loss.simix_per_class": 0,
                                                         "train.global_batch": 4000})
    check(["recipe=ibc", "data=cub", "loss=rsk"], {"loss.name": "rsk", "train.global_batch": 54, "loss.lr": 1e-3})
    # A later recipe= wins (the slurm/ scripts pass recipe=rsk first).
    assert load_config(["recipe=rsk", "data=cub", "recipe=none"]) == load_config(["data=cub"])
    # The recipe composes with model=: the eval view is the authors' Resize(256) + CenterCrop(224) only at 224 px.
    check(["recipe=rsk", "data=cub", "model=tiny"], {"data.eval_resize": None, "train.global_batch": 400})
    check(["recipe=rsk", "data=cub", "model=tiny", "model.image_size=224"], {"data.eval_resize": 256})
    # Datasets outside the authors' code get the general rules only.
    check(["recipe=rsk", "data=digits"], {**RSK_ALL, "data.hflip": False, "train.global_batch": 128,
                                          "train.epochs": None})


def test_recipe_files_are_well_formed():
    """Every condition names a preset group or a valid key, and every combination resolves."""
    keys = set(valid_keys())
    for name in names():
        recipe = load(name)
        assert set(recipe) <= {"loss", "rules"}, name
        for rule in recipe["rules"]:
            assert set(rule) <= {"when", "set"} and rule.get("set"), (name, rule)
            for key, value in rule.get("when", {}).items():
                assert key in GROUPS or key in keys, (name, key)
                if key in GROUPS:
                    wanted = value if isinstance(value, list) else [value]
                    assert set(wanted) <= set(presets(key)), (name, key, wanted)
        for data in presets("data"):
            for model in ("tiny", "vitl14_clip"):
                load_config([f"recipe={name}", f"data={data}", f"model={model}"])


def test_unknown_recipe_is_one_line():
    with pytest.raises(UserError, match="unknown recipe=rks; available: ibc, none, roth, rsk"):
        load_config(["recipe=rks"])
    assert Config().recipe == "none"


def test_a_recipe_trains_by_epochs_with_its_optimizer_schedule_and_loss(tmp_path):
    """recipe=ibc on digits: train.epochs decides the steps (recorded in meta.json), RAdam, the step
    schedule's lr / 10 after the milestone, the MPN loss on unnormalised features, through finetune."""
    args = ["recipe=ibc", "data=digits", *SMALL, "train.global_batch=64", "train.chunk_size=32", "train.epochs=2",
            "train.milestones=[1]", "train.checkpoint_every=1000"]
    run_pipeline("stage=finetune", f"run_dir={tmp_path}", *args)
    labels = ShardIndex.load(tmp_path / "shards" / "train").labels
    _, clock = build_sampler("ibc", labels, 64, 4, 0)  # IBC's epoch (combine_sampler.py), not images // 64
    per_epoch = clock.epoch_length(0)
    assert per_epoch > len(labels) // 64
    last = tmp_path / "checkpoints" / f"step_{2 * per_epoch}"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["epochs"] == {"sampler": "ibc", "train_images": len(labels), "steps_per_epoch": per_epoch, "epochs": 2,
                              "max_steps": 2 * per_epoch}
    assert meta["sampler"]["small_classes"] == "repeat" and meta["loss"]
    cfg = load_config(args)
    model = build_encoder(cfg.model, cfg.seed)
    optimizer, scheduler = build_optimizer(model, cfg.train, clock)
    checkpoint.load_dcp(last, model, optimizer, scheduler, no_dist=True)
    assert type(optimizer).__name__ == "RAdam" and len(optimizer.param_groups) == 1   # decay on every parameter
    assert scheduler.get_last_lr() == pytest.approx([cfg.train.lr * 0.1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("data, processes", [("cub", 16), ("cars", 8), ("sop", 16), ("inat", 16), ("vehicleid", 16)])
def test_rsk_batches_split_into_whole_chunks_on_the_slurm_jobs_processes(data, processes):
    cfg = load_config(["recipe=rsk", f"data={data}", "model=vitg14_clip"])
    for n in (1, 2, 4, 8, processes):
        check_shares(cfg.train, n)


def write_sop(root):
    """Ebay_train.txt / Ebay_test.txt: 1,000 products with 4 images (P = 4000 / 4 distinct classes, as
    on SOP) and 3 with 2 (fewer than K = 4); 3 test products with 3 images."""
    header = ("image_id", "class_id", "super_class_id", "path")
    train = [(c * 10 + i, c, 1, f"train/{c}_{i}.JPG") for c in range(1, 1004) for i in range(4 if c <= 1000 else 2)]
    test = [(100000 + c * 10 + i, c, 1, f"test/{c}_{i}.JPG") for c in range(2000, 2003) for i in range(3)]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        (root / name).write_text("\n".join(" ".join(map(str, r)) for r in [header, *rows]) + "\n")
    rng = np.random.default_rng(0)
    for row in train + test:
        (root / row[3]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)).save(root / row[3])


@pytest.mark.slow
def test_rsk_on_sop_trains_with_the_authors_batch_of_4000(tmp_path):
    """The issue's check, on a fixture and the tiny model: recipe=rsk, data=sop, a batch of 4,000 in
    chunks of 50 through the two-pass step, small classes never drawn, one epoch."""
    root = tmp_path / "sop"
    root.mkdir()
    write_sop(root)
    args = [f"run_dir={tmp_path / 'run'}", "recipe=rsk", "data=sop", f"data.root={root}", "model=tiny",
            "data.image_size=32", "train.epochs=1", "data.workers=0", "data.shard_workers=0"]
    run_pipeline("stage=all", *args)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "step_1" / "meta.json").read_text())
    assert meta["sampler"] == {"seed": 0, "global_batch": 4000, "samples_per_class": 4, "small_classes": "skip",
                               "sampler": "rsk"}
    assert meta["epochs"] == {"sampler": "rsk", "train_images": 4006, "steps_per_epoch": 1, "epochs": 1, "max_steps": 1}
    labels = ShardIndex.load(run / "shards" / "train").labels
    batch = build_sampler("rsk", labels, 4000, 4, 0, "skip")[0].batch(0)
    assert len(batch) == 4000 and set(labels[batch].tolist()) == set(range(1, 1001))
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"frozen", "finetuned", "checkpoint"} and "recall@1000" in metrics["finetuned"]
