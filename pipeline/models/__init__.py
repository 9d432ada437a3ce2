"""Encoders: the backbones of each library (timm, open_clip, transformers: one folder each), the embedding head,
export, FLOPs.

May import config and the foundation."""
