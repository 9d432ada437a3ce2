"""transformers: the image models of MODELS (DINOv2, DINOv3, CLIP, SigLIP 2, AIMv2 vision towers);
weights from a from_pretrained folder or a hub id (model.pretrained=hub:<org/name>, through the
Hugging Face cache)."""
from pipeline.models.transformers.build import build
from pipeline.models.transformers.preprocessing import preprocessing
from pipeline.models.transformers.pretrained import check_pretrained

__all__ = ["build", "check_pretrained", "preprocessing"]
