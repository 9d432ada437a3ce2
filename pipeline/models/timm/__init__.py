"""timm: any timm model name (model.arch), DINOv2 and DINOv3 ViTs, AIMv2, EVA included; weights from a
local timm checkpoint (timm's state dict or safetensors, DINOv3's released .pth) or timm's own
pretrained tag (model.pretrained=hub:<tag>, through the Hugging Face cache)."""
from pipeline.models.timm.build import build
from pipeline.models.timm.preprocessing import preprocessing
from pipeline.models.timm.pretrained import check_pretrained

__all__ = ["build", "check_pretrained", "preprocessing"]
