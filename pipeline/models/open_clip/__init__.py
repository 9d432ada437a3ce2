"""open_clip: the image tower of any open_clip model name (CLIP ViTs, and the towers open_clip builds
with timm: SigLIP 2, PE-Core, EVA-02); weights from a local open_clip checkpoint or open_clip's own
pretrained tag (model.pretrained=hub:<tag>, through the Hugging Face cache)."""
from pipeline.models.open_clip.build import build
from pipeline.models.open_clip.preprocessing import preprocessing
from pipeline.models.open_clip.pretrained import check_pretrained

__all__ = ["build", "check_pretrained", "preprocessing"]
