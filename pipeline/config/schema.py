"""The config's schema: one dataclass per section, each with the checks of its own values beside it.

A leaf: it imports no torch and no feature module, so a config is read and checked (also on a Slurm
submit host) without them, and every typo of a choice key fails at load, before any stage runs.
Checks that need the environment (files, installed packages, weight formats, process counts) are
the preflight's (pipeline/preflight.py). The choice lists below are the ones the features build from.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from pipeline import protocols
from pipeline.config.backends import NAMES as BACKENDS
from pipeline.config.backends import backend
from pipeline.errors import UserError

STAGES = ("shard", "embed", "finetune", "eval", "export", "index", "search", "serve", "all", "config", "plan")  # config: print the settings, run nothing
DEVICES = ("auto", "cpu", "cuda")
IMAGE_FORMATS = ("png", "jpg", "webp")
FAMILIES = ("timm", "open_clip", "transformers")  # pipeline/models/<family>/, one folder each
OPTIMIZERS = ("adamw", "adam", "sgd", "radam")
SCHEDULES = ("cosine", "step")
SMALL_CLASSES = ("repeat", "skip")
PRECISIONS = ("auto", "bf16", "fp32")  # train.precision, parallel.param_dtype (pipeline/parallel/precision.py)
SAMPLERS = ("pk", "rsk", "ibc", "roth")  # pipeline/data/epoch_rules.py
GENERATED = ("digits", "fashion_mnist", "glyphs")  # datasets drawn in memory, with no original files
KERNELS = ("auto", "torch", "triton", "reference")  # RS@k smooth ranks (pipeline/losses/recall_at_k.py)
TUPLE_LOSSES = ("contrastive", "triplet", "margin", "multi_similarity", "lifted")
DISTANCE_LOSSES = ("contrastive", "triplet", "margin")  # the losses Roth's distance-weighted triplets feed
CLASS_LOSSES = ("proxy_anchor", "normalized_softmax", "arcface")
LOSSES = ("rsk", "rsk_simix", *TUPLE_LOSSES, *CLASS_LOSSES, "mpn")  # pipeline/losses/build.py
MINERS = ("default", "distance")
EVAL_MODELS = ("frozen", "finetuned", "checkpoint")
TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
WANDB_MODES = ("offline", "online")
INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")  # pipeline/search/faiss_index.py
RERANKS = ("none", "aqe", "dba", "kreciprocal")  # pipeline/eval/rerank.py's METHODS


def closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def one_of(value: str, options: tuple[str, ...], message: str) -> None:
    """A choice key's check: its one line, and the closest choice."""
    if value not in options:
        raise UserError(f"{message}{closest(str(value), list(options))}")


def val_metric_names(ks) -> list[str]:
    """The validation scalars train.best_metric can name."""
    return [f"val/recall@{k}" for k in ks] + ["val/map@r"]


@dataclass
class DataConfig:
    name: str = "digits"            # converter: see pipeline/data/converters/
    root: str | None = None         # dataset folder on disk (not needed by digits)
    image_size: int = 32            # side of the images stored in the shards; 0 = the original files' size (datasets read from files)
    image_format: str = "png"       # png | jpg | webp
    test_fraction: float = 0.5      # imagefolder: share of classes held out for test (class-disjoint)
    shard_max_count: int = 10_000   # samples per tar shard
    shard_max_size: int = 1 << 30   # bytes per tar shard
    workers: int = 0                # DataLoader workers per process: training, validation, embed and eval
    shard_workers: int | None = None  # processes decoding/encoding images in the shard stage (0: none; None: auto)
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # RandomResizedCrop
    hflip: bool = True              # random horizontal flips (off for digits: a flipped 2 is not a 2)
    val_classes: float = 0.1        # training classes held out as shards/val: < 1 a fraction, >= 1 a count; 0 none
    eval_resize: int | None = None  # eval view: shorter side resized to this, then centre crop; None = model.image_size
    random_erasing: float = 0.0     # training: probability of erasing a random rectangle (IBC: 0.5)
    font_dirs: list[str] = field(default_factory=list)  # glyphs: font folders added to matplotlib's fonts
    min_fonts: int = 8              # glyphs: a character is a class when at least this many fonts draw it
    max_fonts: int | None = None    # glyphs: ... and at most this many (None: no limit); 4 to 7 gives classes apart from the >= 8 set
    seed: int | None = None         # the shard stage's seed (class split, val classes, glyph jitter); None = seed

    def check(self) -> None:
        one_of(self.image_format, IMAGE_FORMATS, f"data.image_format={self.image_format}: use png, jpg or webp")
        if self.val_classes < 0 or (self.val_classes >= 1 and self.val_classes != int(self.val_classes)):
            raise UserError(f"data.val_classes={self.val_classes}: a fraction below 1 (e.g. 0.1), a whole number of "
                            "classes, or 0 for none")
        if self.max_fonts is not None and self.max_fonts < self.min_fonts:
            raise UserError(f"data.max_fonts={self.max_fonts} is below data.min_fonts={self.min_fonts}: "
                            "no character can be a class")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise UserError(f"data.random_erasing={self.random_erasing} must be a probability in [0, 1]")
        if self.image_size < 0 or (self.image_size == 0 and self.name in GENERATED):
            raise UserError(f"data.image_size={self.image_size}: give a side in pixels (0, keep the originals, is for "
                            "datasets read from image files)")

    def identity(self) -> dict:
        """What a checkpoint records of the data it was trained on (refused on other data)."""
        return {"name": self.name, "root": self.root}


@dataclass
class LoraConfig:
    """model.lora: low-rank adapters through peft (pipeline/models/lora.py); rank 0 = off (full finetuning)."""
    rank: int = 0                   # r of each adapter; 0 = no LoRA
    alpha: float = 16.0             # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0            # dropout on the adapters' input (replayed in pass 2 of the two-pass step)
    targets: list[str] | None = None  # peft target_modules names (e.g. [qkv, proj]); None = every Linear (and MultiheadAttention) of each block

    def check(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.lora.rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}: need rank >= 0 "
                            "(0 = off), alpha > 0 and 0 <= dropout < 1")
        if self.targets is not None and not self.targets:
            raise UserError("model.lora.targets=[] adapts nothing: name modules (e.g. [qkv,proj]) or leave it unset")


@dataclass
class ModelConfig:
    name: str = "tiny"
    family: str = "timm"            # timm | open_clip | transformers (see pipeline/models/<family>/)
    arch: str = "vit_tiny_patch16_224"  # timm name | open_clip name (ViT-L-14) | a transformers class (DINOv3ViTModel, ...)
    pretrained: str | None = None   # local weights in the upstream format (file; transformers: folder), hub:<tag or hub id>; None = random init
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
    lora: LoraConfig = field(default_factory=LoraConfig)

    @classmethod
    def from_dict(cls, saved: dict) -> "ModelConfig":
        """From a record of one (dataclasses.asdict, a checkpoint's or export's JSON); keys it does not know
        are left out, model.lora becomes its dataclass again."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        if isinstance(values.get("lora"), dict):
            values["lora"] = LoraConfig(**values["lora"])
        return cls(**values)

    def check(self) -> None:
        one_of(self.family, FAMILIES, f"model.family={self.family} is not supported; use one of {', '.join(FAMILIES)}")
        self.lora.check()
        if self.lora.rank and self.trainable_blocks >= 0:
            raise UserError(f"model.lora.rank={self.lora.rank} trains the adapters of every block and freezes the rest: "
                            f"leave model.trainable_blocks=-1 (it is {self.trainable_blocks})")


@dataclass
class ParallelConfig:
    name: str = "none"              # none | ddp | zero1 | zero2 | zero3 | zero3_offload | fsdp2 (pipeline/parallel/engine.py)
    deepspeed_config: str | None = None  # zero*: DeepSpeed JSON; None = ds_configs/<name>.json
    fsdp_reshard_after_forward: bool = True  # fsdp2: free gathered weights after each block's forward
    param_dtype: str = "auto"       # fsdp2, zero*: weights gathered/held in auto (bf16 when the forward is bf16 on CUDA) | bf16 | fp32 (pipeline/parallel/precision.py)
    timeout: float | None = None    # seconds a collective waits for the other ranks before failing; None = the backend's (gloo 30 min, NCCL 10 min)

    def check(self) -> None:
        one_of(self.name, BACKENDS, f"parallel.name={self.name} is unknown; use one of {', '.join(BACKENDS)}")
        if self.timeout is not None and self.timeout <= 0:
            raise UserError(f"parallel.timeout={self.timeout}: give seconds > 0, or leave it unset for the backend's own")


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
    warmup_fraction: float = 0.0    # > 0: the warmup is this share of max_steps (rounded, at least 1), instead of warmup_steps
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
    peak_tflops: float = 0.0        # one device's peak TFLOP/s in the run's matmul precision (bf16/tf32/fp32); 0 = from the GPU's name
    optimizer: str = "adamw"        # adamw | adam (L2 decay added to the gradient) | sgd (momentum 0.9) | radam (decoupled decay)
    schedule: str = "cosine"        # cosine (after warmup, to 0 at max_steps) | step (x gamma at each milestone)
    milestones: list[float] = field(default_factory=list)  # step schedule, in epochs
    gamma: float = 0.1              # step schedule: lr factor at each milestone
    epochs: int | None = None       # set: max_steps = epochs x (train split's images // global_batch)
    small_classes: str = "repeat"   # classes with fewer than samples_per_class images: repeat them | skip (never drawn)
    decay_norms_biases: bool = False  # weight decay on every parameter (the papers' code), not on weight matrices only
    rsk_kernel: str = "auto"        # RS@k smooth ranks: auto (triton on CUDA, else torch) | torch | triton | reference
    split_loss: bool = True         # RS@k (+SiMix) under several processes: each rank computes its own queries' rows
    precision: str = "auto"         # the forward: auto (bf16 on CUDA, fp32 on the CPU) | bf16 (autocast, fp32 weights) | fp32 (pipeline/parallel/precision.py)
    tf32: bool = True               # fp32 runs on CUDA: matmuls and convolutions in TF32 (pipeline/parallel/precision.py)
    sampler: str = "pk"             # pk | rsk | ibc | roth: the batches and the epoch's length (pipeline/data/epoch_rules.py)
    redraw_pk: bool = False         # sampler=ibc: each epoch draws (P, K) anew among global_batch's divisors (IBC on CUB)
    val_every_epochs: int = 0       # validate at the end of every N-th epoch (the papers' cadence) instead of val_every; 0 = off
    reload_best_at: list[float] = field(default_factory=list)  # epochs at whose start the best checkpoint's weights are loaded back (IBC)
    compile: bool = False           # torch.compile of each transformer block (pipeline/train/compile.py); not under zero3/fsdp2
    layer_decay: float = 1.0        # layer-wise lr decay: block i of L at lr x d^(L-1-i), embeddings d^L, head undecayed; 1.0 = off (pipeline/train/layer_decay.py)

    def check(self) -> None:
        """The batch arithmetic, the optimizer and schedule, the kernel: each refused in one line."""
        if self.global_batch % self.samples_per_class:
            raise UserError(f"train.global_batch={self.global_batch} must be a multiple of "
                            f"train.samples_per_class={self.samples_per_class}")
        if self.chunk_size < 1 or self.global_batch < 2:
            raise UserError("train.chunk_size must be >= 1 and train.global_batch >= 2")
        one_of(self.optimizer, OPTIMIZERS, f"train.optimizer={self.optimizer}: use one of {', '.join(OPTIMIZERS)}")
        one_of(self.schedule, SCHEDULES, f"train.schedule={self.schedule}: use one of {', '.join(SCHEDULES)}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"train.epochs={self.epochs}: give a positive number of epochs, or null to use train.max_steps")
        if any(m < 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise UserError(f"train.milestones={list(self.milestones)}: give epochs in increasing order, e.g. [10,20,30]")
        if self.gamma <= 0:
            raise UserError(f"train.gamma={self.gamma} must be positive")
        one_of(self.small_classes, SMALL_CLASSES, f"train.small_classes={self.small_classes}: use repeat or skip")
        one_of(self.rsk_kernel, KERNELS, f"train.rsk_kernel={self.rsk_kernel} is unknown; use one of {', '.join(KERNELS)}")
        if self.val_every < 0:
            raise UserError(f"train.val_every={self.val_every}: give a number of steps, or 0 to not validate")
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"train.warmup_fraction={self.warmup_fraction}: give a share of the steps in [0, 1), "
                            "e.g. 0.05, or 0 to use train.warmup_steps")
        one_of(self.sampler, SAMPLERS, f"train.sampler={self.sampler}: use one of {', '.join(SAMPLERS)}")
        if self.redraw_pk and self.sampler != "ibc":
            raise UserError("train.redraw_pk=true is IBC's per-epoch (P, K) draw: set train.sampler=ibc, or redraw_pk=false")
        if self.val_every_epochs < 0:
            raise UserError(f"train.val_every_epochs={self.val_every_epochs}: give a number of epochs, or 0 to use "
                            "train.val_every")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"train.layer_decay={self.layer_decay}: give a factor in (0, 1] (0.75 is usual; 1.0 = off)")
        if self.reload_best_at and not (self.val_every or self.val_every_epochs):
            raise UserError("train.reload_best_at needs a best checkpoint: set train.val_every_epochs or train.val_every")


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
    reduction: str = "pml"          # tuple losses: pml (the loss's own reducer) | mean (over all tuples, Roth's criteria); multi_similarity: over the anchors with mined pairs
    mpn_dropout: float = 0.1        # mpn: attention, residual and feed-forward dropout (IBC: 0.1)
    mpn_concat: bool = False        # mpn: classify the concatenation of every layer's output (IBC on Cars)

    def check(self) -> None:
        """The loss settings a user can get wrong, each refused in one line."""
        one_of(self.name, LOSSES, f"unknown loss.name={self.name}; available: {', '.join(LOSSES)}")
        roth = ", ".join(DISTANCE_LOSSES)
        one_of(self.miner, MINERS, f"loss.miner={self.miner}: use default (the loss's own miner) or distance (Roth et al.'s)")
        if self.miner == "distance" and self.name not in DISTANCE_LOSSES:
            raise UserError(f"loss.miner=distance is for {roth}, not loss={self.name}")
        if not 0.0 <= self.p_switch <= 1.0:
            raise UserError(f"loss.p_switch={self.p_switch} must be a probability in [0, 1]")
        if self.p_switch and (self.name not in DISTANCE_LOSSES or self.miner != "distance"):
            raise UserError(f"loss.p_switch (Roth et al.'s rho rule) lives in his distance-weighted miner: use it with "
                            f"loss.miner=distance and one of {roth} (loss={self.name}, loss.miner={self.miner})")
        if self.distance_power not in (1, 2) or self.reduction not in ("pml", "mean"):
            raise UserError(f"loss.distance_power={self.distance_power}, loss.reduction={self.reduction}: "
                            "use 1 or 2, and pml or mean")
        if ((self.distance_power != 1 and self.name not in DISTANCE_LOSSES)
                or (self.reduction != "pml" and self.name not in (*DISTANCE_LOSSES, "multi_similarity"))):
            raise UserError(f"loss.distance_power and loss.reduction are for {roth} (reduction also multi_similarity), "
                            f"not loss={self.name}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise UserError(f"loss.weight_decay={self.weight_decay} must be >= 0 (or null: train.weight_decay)")
        if self.mpn_layers < 0 or self.mpn_heads < 1 or not 0.0 <= self.mpn_dropout < 1.0:
            raise UserError(f"loss.mpn_layers={self.mpn_layers}, loss.mpn_heads={self.mpn_heads}, "
                            f"loss.mpn_dropout={self.mpn_dropout}: need layers >= 0, heads >= 1, 0 <= dropout < 1")
        if self.simix_per_class < 0:
            raise UserError(f"loss.simix_per_class={self.simix_per_class}: use 0 (every pair) or a positive count")


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
    rerank: Any = "none"            # aqe | dba | kreciprocal, or a list: each scored beside plain kNN ("finetuned+aqe")

    def check(self) -> None:
        chosen = self.models
        if not chosen or any(m not in EVAL_MODELS for m in chosen) or len(set(chosen)) < len(chosen):
            raise UserError(f"eval.models={self.models}: list some of {', '.join(EVAL_MODELS)}, each once")
        methods = self.rerankings()
        if any(m not in RERANKS for m in methods) or len(set(methods)) < len(methods):
            raise UserError(f"eval.rerank={self.rerank}: name one or a list of aqe, dba, kreciprocal (or none), each once")

    def rerankings(self) -> list[str]:
        """eval.rerank as a list of methods, without none."""
        chosen = [self.rerank] if isinstance(self.rerank, str) or self.rerank is None else list(self.rerank)
        return [str(m) for m in chosen if m not in (None, "none")]


@dataclass
class ExportConfig:
    checkpoint: str = "latest"      # latest | best | step_<N> of run_dir/checkpoints, or a checkpoint folder
    onnx: bool = False              # also export/model.onnx (dynamic batch), checked against torch with onnxruntime


@dataclass
class TrackConfig:
    """Where the training scalars go (`track=<preset>`), besides run_dir/logs/metrics.jsonl; rank 0 only."""
    name: str = "tensorboard"       # tensorboard (run_dir/tb) | wandb | mlflow | none
    project: str = "retrieval"      # wandb project, mlflow experiment
    run_name: str | None = None     # None: the run directory's name
    wandb_mode: str = "offline"     # offline (run_dir/wandb, `wandb sync` later) | online
    mlflow_uri: str | None = None   # None: a local SQLite store, run_dir/mlflow.db

    def check(self) -> None:
        """The tracker's name; whether its library is installed is the preflight's question."""
        one_of(self.name, TRACKERS, f"track={self.name}: use one of {', '.join(TRACKERS)}")
        one_of(self.wandb_mode, WANDB_MODES, f"track.wandb_mode={self.wandb_mode}: use offline or online")


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
    dba: bool = False               # database-side augmentation: the index holds each vector averaged with its rerank.n neighbours
    queries: int = 1000             # held-out gallery items measured (leave-one-out) for index/report.json
    train_sample: int = 100_000     # vectors the hnsw/ivfpq quantisers are trained on (a seeded sample)
    gpu: bool = True                # build on a GPU with faiss-gpu where CUDA and faiss-gpu are present

    def check(self) -> None:
        one_of(self.kind, INDEX_KINDS, f"index.kind={self.kind}: use auto, flat, hnsw or ivfpq")
        if (self.max_memory_gb <= 0 or not 0 < self.target_recall <= 1 or self.rerank < 1 or self.queries < 1
                or self.train_sample < 1):
            raise UserError("index.max_memory_gb must be > 0, index.target_recall in (0, 1], and index.rerank, "
                            "index.queries, index.train_sample >= 1")


@dataclass
class SearchConfig:
    images: Any = None              # an image file, a folder of images, or a list of them ([a.jpg,b.jpg])
    k: int = 5                      # results per query
    rerank: str = "none"            # stage=search and stage=serve: none | aqe | dba (an index built with index.dba=true) | kreciprocal

    def check(self) -> None:
        if self.k < 1:
            raise UserError(f"search.k={self.k}: give at least 1 result per query")
        one_of(self.rerank, RERANKS, f"search.rerank={self.rerank}: use one of {', '.join(RERANKS)}")


@dataclass
class RerankConfig:
    """The re-rankings' parameters (pipeline/eval/rerank.py; search.rerank and eval.rerank choose the method),
    the authors' defaults: Radenovic et al. (aqe, dba), Zhong et al. (kreciprocal)."""
    n: int = 10                     # aqe, dba: neighbours added to each query (aqe) or gallery vector (dba)
    alpha: float = 3.0              # aqe, dba: a neighbour's weight is its cosine similarity ** alpha (itself: 1)
    k1: int = 20                    # kreciprocal: the k-reciprocal neighbourhood
    k2: int = 6                     # kreciprocal: local query expansion over the top k2
    lambda_value: float = 0.3       # kreciprocal: final distance = (1 - lambda) Jaccard + lambda original
    shortlist: int = 100            # kreciprocal: the query's top candidates re-ranked (the others keep their order after them)

    def check(self) -> None:
        if min(self.n, self.k1, self.k2, self.shortlist) < 1 or self.alpha < 0 or not 0 <= self.lambda_value <= 1:
            raise UserError(f"rerank.n={self.n}, rerank.k1={self.k1}, rerank.k2={self.k2}, rerank.shortlist="
                            f"{self.shortlist} must be >= 1, rerank.alpha={self.alpha} >= 0 and rerank.lambda_value="
                            f"{self.lambda_value} in [0, 1]")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"         # 0.0.0.0 listens on every interface
    port: int = 8080
    k: int = 10                     # results per query unless the request's ?k= says otherwise
    max_megapixels: float = 25.0    # larger images get 413 (read from the header, never decoded)
    max_bytes: int = 20_000_000     # larger bodies get 413

    def check(self) -> None:
        if self.k < 1:
            raise UserError(f"serve.k={self.k}: give at least 1 result per query")
        if not 0 <= self.port <= 65535:
            raise UserError(f"serve.port={self.port} is not a TCP port (0-65535)")
        if self.max_megapixels <= 0 or self.max_bytes <= 0:
            raise UserError("serve.max_megapixels and serve.max_bytes must be > 0")


@dataclass
class PlanConfig:
    """stage=plan (pipeline/plan/, docs/plan.md): the cluster the run is planned for."""
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "H100-80GB"          # a name of pipeline/plan/gpus.py's table, or any with gpu_memory_gb (and train.peak_tflops)
    gpu_memory_gb: float | None = None  # GiB per GPU; None = the table's
    mfu: float = 0.3                # share of the peak FLOP/s (of the run's precision) the step runs at (docs/plan.md: why 0.3)
    bandwidth_gbps: float | None = None  # Gbit/s each GPU sends at; None = NVLink on one node, the NIC between nodes
    train_images: int | None = None  # the training split's images, for the epoch time; None = the dataset's known count
    search: bool = True             # search the largest train.chunk_size that fits
    all_blocks: bool = False        # simulate every transformer block; false: two small depths, extrapolated exactly (pipeline/plan/depth.py)

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or not 0 < self.mfu <= 1:
            raise UserError(f"plan.nodes={self.nodes}, plan.gpus_per_node={self.gpus_per_node}, plan.mfu={self.mfu}: "
                            "give at least one node and one GPU, and an MFU in (0, 1]")


@dataclass
class Config:
    stage: str = "all"
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    force: bool = False             # rerun stages that are already complete
    lock: bool = True               # one writer per run_dir (run_dir/.lock, pipeline/run_lock.py); false where flock does not work
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    recipe: str = "none"            # a paper's settings (presets/recipe/): rsk | roth | ibc | none
    plan: PlanConfig = field(default_factory=PlanConfig)

    def check(self) -> None:
        """Every section's own checks, then those across sections."""
        if self.stage not in STAGES:
            raise UserError(f"unknown stage '{self.stage}'{closest(self.stage, list(STAGES))} (one of {', '.join(STAGES)})")
        for section in (self.data, self.model, self.parallel, self.train, self.loss, self.eval, self.index, self.search,
                        self.rerank, self.serve, self.track, self.plan):
            section.check()
        one_of(self.device, DEVICES, f"device={self.device}: use auto, cpu or cuda")
        ks = self.protocol().ks
        if self.train.best_metric not in val_metric_names(ks):
            raise UserError(f"train.best_metric={self.train.best_metric}: use one of {', '.join(val_metric_names(ks))}")
        self.check_precision()
        if self.train.compile and backend(self.parallel.name).gathers_weights:
            raise UserError(f"train.compile=true compiles each block, whose forward parallel={self.parallel.name} hooks "
                            f"into (weights gathered per block); use parallel=none, ddp, zero1 or zero2, or "
                            f"train.compile=false")
        d = self.data
        if d.eval_resize is not None and d.eval_resize < self.model.image_size:
            raise UserError(f"data.eval_resize={d.eval_resize} must be >= model.image_size={self.model.image_size} "
                            "(the eval view is a centre crop of the resized image)")

    def protocol(self) -> protocols.Protocol:
        """The dataset's evaluation protocol with eval.ks, eval.split and eval.gallery applied."""
        return protocols.resolve(self.data.name, self.eval.ks, self.eval.split, self.eval.gallery)

    def check_precision(self) -> None:
        """train.precision and parallel.param_dtype, and the combinations that contradict each other."""
        precision, param_dtype, name = self.train.precision, self.parallel.param_dtype, self.parallel.name
        one_of(precision, PRECISIONS, f"train.precision={precision} is unknown; use one of {', '.join(PRECISIONS)}")
        one_of(param_dtype, PRECISIONS, f"parallel.param_dtype={param_dtype} is unknown; use one of {', '.join(PRECISIONS)}")
        if param_dtype == "bf16" and not backend(name).holds_weights:
            raise UserError(f"parallel.param_dtype=bf16 applies to fsdp2 and zero* (parallel={name} keeps fp32 "
                            "weights); set train.precision=bf16 for a bf16 forward, or leave parallel.param_dtype=auto")
        if param_dtype == "bf16" and precision == "fp32":
            raise UserError("parallel.param_dtype=bf16 computes the forward in bf16, which train.precision=fp32 forbids; "
                            "set parallel.param_dtype=fp32 (or auto)")
