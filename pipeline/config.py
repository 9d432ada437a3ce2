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

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import recipe as recipes
from pipeline.errors import UserError

PRESETS = Path(__file__).parent / "presets"
STAGES = ("shard", "embed", "finetune", "eval", "export", "index", "search", "serve", "all")


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
    val_classes: float = 0.1        # training classes held out as shards/val: < 1 a fraction, >= 1 a count; 0 none
    eval_resize: int | None = None  # eval view: shorter side resized to this, then centre crop; None = model.image_size
    random_erasing: float = 0.0     # training: probability of erasing a random rectangle (IBC: 0.5)
    font_dirs: list[str] = field(default_factory=list)  # glyphs: font folders added to matplotlib's fonts
    min_fonts: int = 8              # glyphs: a character is a class when at least this many fonts draw it
    max_fonts: int | None = None    # glyphs: ... and at most this many (None: no limit); 4 to 7 gives classes apart from the >= 8 set
    seed: int | None = None         # the shard stage's seed (class split, val classes, glyph jitter); None = seed


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
    timeout: float | None = None    # seconds a collective waits for the other ranks before failing; None = the backend's (gloo 30 min, NCCL 10 min)


@dataclass
class TrainConfig:
    max_steps: int = 200
    global_batch: int = 128
    chunk_size: int = 32            # images per forward in the two-pass step
    samples_per_class: int = 4      # K of the P x K sampler
    lr: float = 1e-4
    head_lr: float | None = 1e-3    # the new embedding head learns faster than the backbone; None = train.lr
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
    trust_checkpoint: bool = False  # allow pickle (arbitrary code) in checkpoints and weights from elsewhere
    val_every: int = 50             # validate every N steps and at the last one; 0 = never
    val_split: str = "auto"         # auto (val if the shards have it, else test) | val | test | any split name
    best_metric: str = "val/recall@1"  # checkpoints/best: the checkpoint with the highest value of this
    grad_clip: float = 0.0          # clip the global gradient norm to this; 0 = off
    peak_tflops: float = 0.0        # a device's peak bf16 TFLOP/s for perf/mfu; 0 = from the GPU's name
    optimizer: str = "adamw"        # adamw | adam (L2 decay added to the gradient) | sgd (momentum 0.9) | radam (decoupled decay)
    schedule: str = "cosine"        # cosine (after warmup, to 0 at max_steps) | step (x gamma at each milestone)
    milestones: list[float] = field(default_factory=list)  # step schedule, in epochs
    gamma: float = 0.1              # step schedule: lr factor at each milestone
    epochs: int | None = None       # set: max_steps = epochs x (train split's images // global_batch)
    small_classes: str = "repeat"   # classes with fewer than samples_per_class images: repeat them | skip (never drawn)
    decay_norms_biases: bool = False  # weight decay on every parameter (the papers' code), not on weight matrices only
    rsk_kernel: str = "auto"        # RS@k smooth ranks: auto (triton on CUDA, else torch) | torch | triton | reference
    split_loss: bool = True         # RS@k (+SiMix) under several processes: each rank computes its own queries' rows


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
    weight_decay: float | None = None  # the loss's own parameters; None = train.weight_decay
    miner: str = "default"          # tuple losses: default (each loss's pml miner) | distance (Roth's distance-weighted)
    distance_power: int = 1         # tuple losses: 1 = Euclidean distance, 2 = squared (Roth's triplet loss)
    reduction: str = "pml"          # tuple losses: pml (the loss's own reducer) | mean (over all tuples, Roth's criteria)
    mpn_dropout: float = 0.1        # mpn: attention, residual and feed-forward dropout (IBC: 0.1)
    mpn_concat: bool = False        # mpn: classify the concatenation of every layer's output (IBC on Cars)


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
    show_queries: int = 4           # eval/retrievals.png: this many seeded queries, and as many of the worst; 0: none
    show_k: int = 5                 # eval/retrievals.png: results shown per query


@dataclass
class ExportConfig:
    checkpoint: str = "latest"      # latest | best | step_<N> of run_dir/checkpoints, or a checkpoint folder
    onnx: bool = False              # also export/model.onnx (dynamic batch), checked against torch with onnxruntime


@dataclass
class IndexConfig:
    """stage=index: a gallery embedded and put in a faiss index, run_dir/index/ (pipeline/search/)."""
    kind: str = "auto"              # auto (flat while it fits index.max_memory_gb, else hnsw, else ivfpq) | flat | hnsw | ivfpq
    max_memory_gb: float = 8.0      # RAM the index may take (auto's budget; ivfpq sizes its codes to it)
    split: str = "test"             # the gallery: run_dir/shards/<split> ...
    gallery: str | None = None      # ... or a split folder of shards made elsewhere (stage=shard of another run_dir)
    checkpoint: str | None = None   # None: run_dir/export; latest | best | step_<N> of run_dir/checkpoints, or a folder
    target_recall: float = 0.95     # hnsw/ivfpq: the smallest efSearch / nprobe reaching this recall@10 on held-out queries
    rerank: int = 4                 # hnsw/ivfpq: a shortlist of rerank x k candidates, re-ranked by exact inner product
    queries: int = 1000             # held-out gallery items measured (leave-one-out) for index/report.json
    train_sample: int = 100_000     # vectors the hnsw/ivfpq quantisers are trained on (a seeded sample)
    gpu: bool = True                # build on a GPU with faiss-gpu where CUDA and faiss-gpu are present


@dataclass
class SearchConfig:
    images: Any = None              # an image file, a folder of images, or a list of them ([a.jpg,b.jpg])
    k: int = 5                      # results per query


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"         # 0.0.0.0 listens on every interface
    port: int = 8080
    k: int = 10                     # results per query unless the request's ?k= says otherwise
    max_megapixels: float = 25.0    # larger images get 413 (read from the header, never decoded)
    max_bytes: int = 20_000_000     # larger bodies get 413


@dataclass
class TrackConfig:
    """Where the training scalars go (`track=<preset>`), besides run_dir/logs/metrics.jsonl; rank 0 only."""
    name: str = "tensorboard"       # tensorboard (run_dir/tb) | wandb | mlflow | none
    project: str = "retrieval"      # wandb project, mlflow experiment
    run_name: str | None = None     # None: the run directory's name
    wandb_mode: str = "offline"     # offline (run_dir/wandb, `wandb sync` later) | online
    mlflow_uri: str | None = None   # None: a local SQLite store, run_dir/mlflow.db


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
    export: ExportConfig = field(default_factory=ExportConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    recipe: str = "none"            # a paper's settings (presets/recipe/): rsk | roth | ibc | none


GROUPS = ("data", "model", "parallel", "loss", "track")  # groups that presets fill


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
        if key == "recipe":
            if value not in recipes.names():
                raise UserError(f"unknown recipe={value}; available: {', '.join(recipes.names())}")
            chosen[key] = value
        elif key in GROUPS:
            if value not in presets(key):
                raise UserError(f"unknown preset {key}={value}; available: {', '.join(presets(key))}")
            chosen[key] = value
        elif key in valid_keys():
            overrides.append((key, value))
        else:
            raise UserError(f"unknown config key '{key}'{_closest(key, valid_keys())}")
    return chosen, overrides


def load_config(args: list[str]) -> Config:
    """Defaults < presets (data=, model=, parallel=, loss=) < recipe= < dotted overrides, validated
    against the dataclasses (see pipeline/recipe.py for how a recipe composes)."""
    chosen, overrides = _parse_args(args)
    recipe = _recipe(chosen)
    cfg = OmegaConf.structured(Config)
    for group in GROUPS:
        chosen[group] = chosen.get(group, getattr(cfg, group).name)
        preset = OmegaConf.load(PRESETS / group / f"{chosen[group]}.yaml")
        try:
            cfg = OmegaConf.merge(cfg, {group: preset})
        except OmegaConfBaseException as e:
            raise UserError(f"preset {group}={chosen[group]}: {e.msg}") from None
    for key, value in overrides:  # a value YAML cannot read ('...', '[1,') is named, not a traceback
        try:
            OmegaConf.from_dotlist([f"{key}={value}"])
        except yaml.YAMLError as e:
            raise UserError(f"bad value for '{key}': {value!r} is not a YAML value ({e.problem}); quote it") from None
    try:
        dotlist = OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides])
        probe = OmegaConf.merge(cfg, dotlist)
    except OmegaConfBaseException as e:
        raise UserError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from None
    if recipe is not None:
        for block in recipes.settings(recipe, chosen, probe):
            try:
                cfg = OmegaConf.merge(cfg, block)
            except OmegaConfBaseException as e:
                raise UserError(f"recipe={chosen['recipe']}: {e.msg}") from None
        cfg.recipe = chosen["recipe"]
    cfg = OmegaConf.merge(cfg, dotlist)
    config: Config = OmegaConf.to_object(cfg)
    if config.data.seed is None:  # resolved here, so that the saved config and the fingerprints say which
        config.data.seed = config.seed
    validate(config)
    return config


def _recipe(chosen: dict[str, str]) -> dict | None:
    """The chosen recipe's rules; its default loss preset becomes the loss unless loss= was given."""
    if chosen.get("recipe", "none") == "none":
        return None
    recipe = recipes.load(chosen["recipe"])
    if "loss" in recipe:
        chosen.setdefault("loss", recipe["loss"])
    return recipe


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
    if cfg.parallel.timeout is not None and cfg.parallel.timeout <= 0:
        raise UserError(f"parallel.timeout={cfg.parallel.timeout}: give seconds > 0, or leave it unset for the backend's own")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={cfg.device}: use auto, cpu or cuda")
    models = ("frozen", "finetuned", "checkpoint")
    chosen = cfg.eval.models
    if not chosen or any(m not in models for m in chosen) or len(set(chosen)) < len(chosen):
        raise UserError(f"eval.models={cfg.eval.models}: list some of {', '.join(models)}, each once")
    from pipeline.losses.build import check_loss_config  # here, not at the top: the losses import this module
    check_loss_config(cfg.loss)
    from pipeline.tracking import check_tracking  # the tracking libraries import late, and only when chosen
    from pipeline.validation import check_validation_config
    check_tracking(cfg.track)
    check_validation_config(cfg)
    from pipeline.optim import check_train_config
    check_train_config(cfg.train)
    d = cfg.data
    if d.eval_resize is not None and d.eval_resize < cfg.model.image_size:
        raise UserError(f"data.eval_resize={d.eval_resize} must be >= model.image_size={cfg.model.image_size} "
                        "(the eval view is a centre crop of the resized image)")
    if d.max_fonts is not None and d.max_fonts < d.min_fonts:
        raise UserError(f"data.max_fonts={d.max_fonts} is below data.min_fonts={d.min_fonts}: no character can be a class")
    if not 0.0 <= d.random_erasing <= 1.0:
        raise UserError(f"data.random_erasing={d.random_erasing} must be a probability in [0, 1]")
    from pipeline.losses.recall_at_k import check_kernel
    check_kernel(t.rsk_kernel)
    check_search_config(cfg)


def check_search_config(cfg: Config) -> None:
    """index.*, search.*, serve.* (stage=index, search, serve)."""
    i = cfg.index
    if i.kind not in ("auto", "flat", "hnsw", "ivfpq"):
        raise UserError(f"index.kind={i.kind}: use auto, flat, hnsw or ivfpq")
    if i.max_memory_gb <= 0 or not 0 < i.target_recall <= 1 or i.rerank < 1 or i.queries < 1 or i.train_sample < 1:
        raise UserError("index.max_memory_gb must be > 0, index.target_recall in (0, 1], and index.rerank, "
                        "index.queries, index.train_sample >= 1")
    if cfg.search.k < 1 or cfg.serve.k < 1:
        raise UserError(f"search.k={cfg.search.k}, serve.k={cfg.serve.k}: give at least 1 result per query")
    if not 0 <= cfg.serve.port <= 65535:
        raise UserError(f"serve.port={cfg.serve.port} is not a TCP port (0-65535)")
    if cfg.serve.max_megapixels <= 0 or cfg.serve.max_bytes <= 0:
        raise UserError("serve.max_megapixels and serve.max_bytes must be > 0")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

