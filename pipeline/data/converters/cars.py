"""Cars196: `cars_annos.mat` (MATLAB struct array `annotations` with `relative_im_path`, e.g.
`car_ims/000001.jpg`, and `class`, 1-based). The standard open-set split: classes 1-98 train,
99-196 test; the file's own `test` flag (a closed-set split) is ignored.
"""
from __future__ import annotations

import numpy as np
from scipy.io import loadmat  # scipy comes with scikit-learn

from pipeline.config import DataConfig
from pipeline.data.converters import find_file, image_record, require_root

TRAIN_CLASSES = range(1, 99)


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    annotations = np.atleast_1d(loadmat(find_file(cfg, root, "cars_annos.mat"), squeeze_me=True)["annotations"])
    splits: dict[str, list] = {"train": [], "test": []}
    for i, (path, label) in enumerate(zip(annotations["relative_im_path"], annotations["class"])):
        split = "train" if int(label) in TRAIN_CLASSES else "test"
        splits[split].append(image_record(root, str(path), int(label), key=f"car{i:06d}"))
    return splits
