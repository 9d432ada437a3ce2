"""Typed config: dataclass defaults, then YAML presets, then `key=value` overrides.

`data=cub` (a group name with a plain value) loads `presets/data/cub.yaml` over the defaults;
`data.root=/x` (a dotted key) sets one field. Unknown keys fail with the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError

PRESETS = Path(__file__).parent / "presets"
STAGES = ("shard", "embed", "finetune", "eval", "export", "all")


@dataclass
class DataConfig:
    name: str = "digits"            # converter: see pipeline/data/converters.py
    root: str | None = None         # dataset folder on disk (not needed by digits)
    image_size: int = 32            # side of the images stored in the shards
    image_format: str = "png"       # png | jpg | webp
    test_fraction: float = 0.5      # imagefolder: share of classes held out for test (class-disjoint)
    shard_max_count: int = 10_000   # samples per tar shard
    shard_max_size: int = 1 << 30   # bytes per tar shard
    workers: int = 0                # DataLoader workers for training
    shard_workers: int = 0          # processes decoding/encoding images in the shard stage (0: none)
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # RandomResizedCrop
    hflip: bool = True              # random horizontal flips (off for digits: a flipped 2 is not a 2)
    font_dirs: list[str] = field(default_factory=list)  # glyphs: font folders added to matplotlib's fonts
    min_fonts: int = 8              # glyphs: a character is a class when at least this many fonts draw it


@dataclass
class ModelConfig:
    name: str = "tiny"
    family: str = "timm"            # timm | open_clip | transformers (see pipeline/backbones/)
    arch: str = "vit_tiny_patch16_224"  # timm name | open_clip name (ViT-L-14) | Dinov2Model | CLIPVisionModel
    pretrained: str | None = None   # local weights in the upstream format (file; transformers: folder); None = random init
    image_size: int = 32
    patch_size: int | None = None   # None = the architecture's own (set by the tiny preset)
    depth: int | None = None        # transformer blocks; None = the architecture's own
    width: int | None = None        # backbone width (hidden size); None = the architecture's own
    heads: int | None = None        # attention heads; None = the architecture's own
    global_pool: str | None = None  # timm pooling (token | avg | ...); None = the architecture's own
    embed_dim: int = 128            # output of the embedding head; 0 = the backbone's own width
    head_norm: bool = True          # LayerNorm before the head's Linear
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    trainable_blocks: int = -1      # -1: all train; N >= 0: only the last N blocks (and what follows them) + head
    mean: list[float] | None = None  # input normalisation; None = the model's own (its weights' preprocessing)
    std: list[float] | None = None


@dataclass
class ParallelConfig:
    name: str = "none"              # none | ddp | zero1 | zero2 | zero3 | zero3_offload | fsdp2 (pipeline/engine.py)
    deepspeed_config: str | None = None  # zero*: DeepSpeed JSON; None = ds_configs/<name>.json
    fsdp_reshard_after_forward: bool = True  # fsdp2: free gathered weights after each block's forward


@dataclass
class TrainConfig:
    max_steps: int = 200
    global_batch: int = 128
    chunk_size: int = 32            # images per forward in the two-pass step
    samples_per_class: int = 4      # K of the P x K sampler
    lr: float = 1e-4
    head_lr: float = 1e-3           # the new embedding head learns faster than the backbone
    weight_decay: float = 0.05
    warmup_steps: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    tau_rank: float = 0.01
    tau_count: float = 1.0
    include_query_in_rank: bool = False
    log_every: int = 10
    requeue: bool = True            # on SIGUSR1/SIGTERM under Slurm: checkpoint, then `scontrol requeue` the job


@dataclass
class LossConfig:
    """The training loss (`loss=<preset>`); RS@k's own keys stay train.ks, train.tau_rank, ..."""
    name: str = "rsk"               # see pipeline/losses/build.py for every name
    lr: float = 1e-3                # AdamW for the loss's own parameters (proxies, beta, MPN), same schedule
    simix_per_class: int = 0        # SiMix virtual samples per class and step; 0 = every within-class pair
    margin: float = 0.2             # the loss's margin (arcface: degrees; contrastive, lifted: negative margin)
    scale: float = 32.0             # proxy_anchor alpha, arcface scale
    beta: float = 1.2               # margin loss: initial beta (learnt per class)
    temperature: float = 0.05       # normalized_softmax and mpn classifiers
    p_switch: float = 0.0           # rho-regularisation (Roth et al.) for the tuple losses
    mpn_layers: int = 2             # intra-batch message passing: attention layers
    mpn_heads: int = 4
    label_smoothing: float = 0.1    # mpn cross entropy


@dataclass
class EvalConfig:
    ks: list[int] | None = None     # None: the dataset's standard ks (pipeline/protocols.py)
    batch_size: int = 256
    nmi: bool = True
    split: str | None = None        # None: the dataset's protocol; else leave-one-out on this split
    gallery: str | None = None      # with eval.split: query split -> this gallery split
    models: list[str] = field(default_factory=lambda: ["frozen", "finetuned"])  # frozen | finetuned | checkpoint
    export: str | None = None       # "finetuned" = this exported model folder instead of run_dir/export
    checkpoint: str = "latest"      # "checkpoint" = latest | step_<N> of run_dir/checkpoints, or a checkpoint folder
    diagnostics: bool = True        # rho and pi_ratio on train and test embeddings (embeds train too)


@dataclass
class Config:
    stage: str = "all"
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    force: bool = False             # rerun stages that are already complete
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


GROUPS = ("data", "model", "parallel", "loss")  # groups that presets fill


def valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. 'train.max_steps'."""
    keys = []
    for f in dataclasses.fields(node):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += valid_keys(f.default_factory, key + ".")
    return keys


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / group).glob("*.yaml"))


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _parse_args(args: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    chosen, overrides = {}, []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value (e.g. stage=all run_dir=runs/demo)")
        key, value = arg.split("=", 1)
        if key in GROUPS:
            if value not in presets(key):
                raise UserError(f"unknown preset {key}={value}; available: {', '.join(presets(key))}")
            chosen[key] = value
        elif key in valid_keys():
            overrides.append((key, value))
        else:
            raise UserError(f"unknown config key '{key}'{_closest(key, valid_keys())}")
    return chosen, overrides


def load_config(args: list[str]) -> Config:
    """Defaults < presets (data=, model=, parallel=) < dotted overrides, validated against the dataclasses."""
    chosen, overrides = _parse_args(args)
    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        name = chosen.get(group, getattr(cfg, group).name)
        preset = OmegaConf.load(PRESETS / group / f"{name}.yaml")
        try:
            cfg = OmegaConf.merge(cfg, {group: preset})
        except OmegaConfBaseException as e:
            raise UserError(f"preset {group}={name}: {e.msg}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides]))
    except OmegaConfBaseException as e:
        raise UserError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def validate(cfg: Config) -> None:
    if cfg.stage not in STAGES:
        raise UserError(f"unknown stage '{cfg.stage}'{_closest(cfg.stage, list(STAGES))} (one of {', '.join(STAGES)})")
    t = cfg.train
    if t.global_batch % t.samples_per_class:
        raise UserError(f"train.global_batch={t.global_batch} must be a multiple of train.samples_per_class={t.samples_per_class}")
    if t.chunk_size < 1 or t.global_batch < 2:
        raise UserError("train.chunk_size must be >= 1 and train.global_batch >= 2")
    if cfg.data.image_format not in ("png", "jpg", "webp"):
        raise UserError(f"data.image_format={cfg.data.image_format}: use png, jpg or webp")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={cfg.device}: use auto, cpu or cuda")
    models = ("frozen", "finetuned", "checkpoint")
    chosen = cfg.eval.models
    if not chosen or any(m not in models for m in chosen) or len(set(chosen)) < len(chosen):
        raise UserError(f"eval.models={cfg.eval.models}: list some of {', '.join(models)}, each once")
    from pipeline.losses.build import check_loss_config  # here, not at the top: the losses import this module
    check_loss_config(cfg.loss)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

