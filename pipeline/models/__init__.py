"""Encoders: the backbones of each library (timm, open_clip, transformers), the embedding head, export, FLOPs.

May import config and the foundation."""
