"""Which stages each setting re-runs: every settable key is classified here, exactly once.

A stage's completion marker holds the values of the keys it depends on (pipeline/runner.py's
fingerprint); changing one of them re-runs that stage and the stages after it. A key added to the
schema without a class here fails tests/test_config.py (and any run, on its first fingerprint), so no
new key is silently left out and a finished stage never reused with stale output.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.config.loader import flatten
from pipeline.config.schema import EvalConfig

# class -> the stages whose output a key of that class changes
AFFECTS = {
    "shard": ("shard", "embed", "finetune", "export", "eval", "index"),  # what the shards hold
    "model": ("embed", "finetune", "export", "eval", "index"),            # the encoder and its random init
    "train": ("finetune", "export", "eval", "index"),                     # what the weights become
    "view": ("embed", "eval", "index"),                                   # how images are embedded for evaluation
    "export": ("export", "eval", "index"),
    "eval": ("eval",),
    "index": ("index",),                                                  # the gallery and its faiss index
    "search": ("search",),                                                # stage=search and stage=serve always run:
    "serve": ("serve",),                                                  # these only say what they answer with
    # Where and how a command runs, or what a run reports and keeps (validation, tracking, logging,
    # checkpoint cadence): changing them re-runs nothing; a finished finetune would resume to do nothing.
    "none": (),
}

# data.seed (the seed unless set) alone seeds the shards; the model's random init and training use seed.
CLASS = {
    # top level
    "stage": "none", "run_dir": "none", "seed": "model", "device": "none", "force": "none", "recipe": "none",
    "lock": "none",
    "export.onnx": "export",
    "index.kind": "index", "index.max_memory_gb": "index", "index.split": "index", "index.gallery": "index",
    "index.checkpoint": "index", "index.target_recall": "index", "index.rerank": "index", "index.queries": "index",
    "index.train_sample": "index", "index.gpu": "none", "index.dba": "index",
    "search.images": "search", "search.k": "search", "search.rerank": "search",
    # the re-rankings' parameters: what search.rerank answers with; eval's and the index's inputs only when they
    # re-rank (WHEN below)
    "rerank.n": "search", "rerank.alpha": "search", "rerank.k1": "search", "rerank.k2": "search",
    "rerank.lambda_value": "search", "rerank.shortlist": "search",
    "serve.host": "serve", "serve.port": "serve", "serve.k": "serve", "serve.max_megapixels": "serve",
    "serve.max_bytes": "serve",
    "plan.nodes": "none", "plan.gpus_per_node": "none", "plan.gpu": "none", "plan.gpu_memory_gb": "none",
    "plan.mfu": "none", "plan.bandwidth_gbps": "none", "plan.train_images": "none", "plan.search": "none",
    "plan.all_blocks": "none",
    # data
    "data.name": "shard", "data.root": "shard", "data.image_size": "shard", "data.image_format": "shard",
    "data.test_fraction": "shard", "data.shard_max_count": "shard", "data.shard_max_size": "shard",
    "data.workers": "none", "data.shard_workers": "none", "data.crop_scale": "train", "data.hflip": "train",
    "data.val_classes": "shard", "data.eval_resize": "view", "data.random_erasing": "train",
    "data.font_dirs": "shard", "data.min_fonts": "shard", "data.max_fonts": "shard", "data.seed": "shard",
    # model
    "model.name": "model", "model.family": "model", "model.arch": "model", "model.pretrained": "model",
    "model.image_size": "model", "model.patch_size": "model", "model.depth": "model", "model.width": "model",
    "model.heads": "model", "model.global_pool": "model", "model.embed_dim": "model", "model.head_norm": "model",
    "model.drop_path": "model", "model.grad_checkpointing": "none", "model.trainable_blocks": "model",
    "model.mean": "model", "model.std": "model",
    # LoRA's B starts at 0: the frozen encoder (stage=embed) is the same with and without adapters
    "model.lora.rank": "train", "model.lora.alpha": "train", "model.lora.dropout": "train", "model.lora.targets": "train",
    # parallel
    "parallel.name": "none", "parallel.deepspeed_config": "none", "parallel.fsdp_reshard_after_forward": "none",
    "parallel.timeout": "none", "parallel.param_dtype": "none",
    # train
    "train.max_steps": "train", "train.global_batch": "train", "train.chunk_size": "train",
    "train.samples_per_class": "train", "train.lr": "train", "train.head_lr": "train", "train.weight_decay": "train",
    "train.warmup_steps": "train", "train.warmup_fraction": "train", "train.checkpoint_every": "none", "train.keep_checkpoints": "none",
    "train.ks": "train", "train.tau_rank": "train", "train.tau_count": "train",
    "train.include_query_in_rank": "train", "train.log_every": "none", "train.requeue": "none",
    "train.trust_checkpoint": "none", "train.val_every": "none", "train.val_split": "none",
    "train.best_metric": "none", "train.grad_clip": "train", "train.peak_tflops": "none", "train.optimizer": "train",
    "train.schedule": "train", "train.milestones": "train", "train.gamma": "train", "train.epochs": "train",
    "train.small_classes": "train", "train.decay_norms_biases": "train", "train.rsk_kernel": "train",
    "train.split_loss": "train", "train.sampler": "train", "train.precision": "model", "train.redraw_pk": "train",
    "train.val_every_epochs": "none", "train.reload_best_at": "train", "train.tf32": "model", "train.layer_decay": "train",
    "train.compile": "none",  # the same step, to float rounding
    # loss
    "loss.name": "train", "loss.lr": "train", "loss.simix_per_class": "train", "loss.margin": "train",
    "loss.scale": "train", "loss.beta": "train", "loss.temperature": "train", "loss.p_switch": "train",
    "loss.mpn_layers": "train", "loss.mpn_heads": "train", "loss.label_smoothing": "train",
    "loss.weight_decay": "train", "loss.miner": "train", "loss.distance_power": "train", "loss.reduction": "train",
    "loss.mpn_dropout": "train", "loss.mpn_concat": "train",
    # eval
    "eval.ks": "eval", "eval.batch_size": "view", "eval.nmi": "eval", "eval.split": "eval", "eval.gallery": "eval",
    "eval.models": "eval", "eval.export": "eval", "eval.checkpoint": "eval", "eval.diagnostics": "eval",
    "eval.show_queries": "eval", "eval.show_k": "eval", "eval.rerank": "eval",
    # export
    "export.checkpoint": "export",
    # track
    "track.name": "none", "track.project": "none", "track.run_name": "none", "track.wandb_mode": "none",
    "track.mlflow_uri": "none",
}


RERANK_KEYS = ("rerank.n", "rerank.alpha", "rerank.k1", "rerank.k2", "rerank.lambda_value", "rerank.shortlist")
# Inputs of a stage only under a setting: eval reports re-rankings with the rerank.* parameters when eval.rerank
# names one; an index built with database-side augmentation (index.dba=true) averages with rerank.n and alpha.
WHEN = {"eval": (lambda values: bool(EvalConfig(rerank=values.get("eval.rerank")).rerankings()), RERANK_KEYS),
        "index": (lambda values: values.get("index.dba") is True, ("rerank.n", "rerank.alpha"))}


def stage_settings(config, stage: str) -> dict:
    """{leaf key: value} of the settings `stage`'s output depends on."""
    values = flatten(OmegaConf.structured(config))
    when, keys = WHEN.get(stage, (lambda _: False, ()))
    return {k: v for k, v in values.items() if is_input(k, stage) or (k in keys and when(values))}


def is_input(key: str, stage: str) -> bool:
    """Whether the leaf key (e.g. 'train.lr') changes the output of `stage`."""
    return stage in AFFECTS[CLASS[key]]


def unclassified(leaf_keys: list[str]) -> list[str]:
    """Keys of the schema missing from CLASS, and names in CLASS the schema does not have."""
    return sorted(set(leaf_keys) ^ set(CLASS))
