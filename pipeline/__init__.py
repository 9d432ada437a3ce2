"""Finetune foundation vision encoders for image retrieval: shard, embed, finetune, eval, export."""
