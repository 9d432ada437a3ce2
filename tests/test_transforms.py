"""The eval view (data.eval_resize) and IBC's random erasing (data.random_erasing)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pipeline.config import DataConfig, ModelConfig, load_config
from pipeline.data.transforms import ERASE_FILL, eval_transform, train_transform
from pipeline.errors import UserError

MODEL = ModelConfig(image_size=24, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])


def picture(w=40, h=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_eval_view_resizes_the_shorter_side_then_crops_the_centre():
    img = picture()
    ours = eval_transform(MODEL, resize=32)(img)
    # The papers' view by hand: shorter side 30 -> 32 (so 40 -> 42.67 -> 42), centre 24 x 24.
    resized = T.functional.to_image(img.resize((42, 32), Image.BILINEAR))   # what torchvision asks PIL for
    top, left = (32 - 24) // 2, (42 - 24) // 2
    crop = resized[:, top:top + 24, left:left + 24].float() / 255
    torch.testing.assert_close(ours, (crop - 0.5) / 0.25, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, eval_transform(MODEL)(img))       # None: resized straight to 24
    with pytest.raises(UserError, match="data.eval_resize=16 must be >= model.image_size=32"):
        load_config(["data.eval_resize=16"])


def test_random_erasing_writes_ibcs_fill_into_one_rectangle():
    img = picture(seed=1)
    erased_any = 0
    for seed in range(20):
        torch.manual_seed(seed)
        plain = train_transform(DataConfig(crop_scale=[1.0, 1.0], hflip=False), MODEL)(img)
        torch.manual_seed(seed)   # the same crop; the erasing draws come after it
        x = train_transform(DataConfig(crop_scale=[1.0, 1.0], hflip=False, random_erasing=1.0), MODEL)(img)
        changed = (x != plain).any(0)
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        assert changed.sum() == len(rows) * len(cols), "one rectangle"
        area = changed.float().mean().item()
        assert 0.02 * 0.5 <= area <= 0.4, area
        torch.testing.assert_close(x[:, changed], torch.tensor(ERASE_FILL)[:, None].expand(3, int(changed.sum())))
        erased_any += 1
    assert erased_any == 20
    torch.manual_seed(19)
    kept = train_transform(DataConfig(crop_scale=[1.0, 1.0], hflip=False, random_erasing=0.0), MODEL)(img)
    assert torch.equal(kept, plain)
