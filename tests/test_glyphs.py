"""data=glyphs: characters drawn by the fonts the dependencies ship, one class per character.

The shards are read back with plain tarfile/PIL (not the converter's code): the splits are
class-disjoint, every class has images from at least data.min_fonts distinct fonts, no image is
blank, the same seed gives the same bytes (whatever data.shard_workers), and glyphs a font's cmap
claims but does not draw as that character are not there.
"""
import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import run_pipeline
from fontTools.ttLib import TTFont
from PIL import Image

from pipeline.config import DataConfig, load_config
from pipeline.data.converters import convert, glyphs
from pipeline.errors import UserError

SYSTEM_DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


def read_split(folder: Path) -> list[tuple[int, dict, np.ndarray]]:
    """(label, metadata, pixels) of every sample of a split, from its tars."""
    samples = []
    for tar_path in sorted(folder.glob("*.tar")):
        members = defaultdict(dict)
        with tarfile.open(tar_path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members[key][ext] = tar.extractfile(info).read()
        for parts in members.values():
            pixels = np.asarray(Image.open(io.BytesIO(parts["png"])))
            samples.append((int(parts["cls"]), json.loads(parts["json"]), pixels))
    return samples


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("glyphs")
    run_pipeline("stage=shard", "data=glyphs", f"run_dir={run_dir}")
    return run_dir


@pytest.fixture(scope="module")
def splits(glyph_run) -> dict[str, list]:
    return {split: read_split(glyph_run / "shards" / split) for split in ("train", "val", "test")}


def test_open_set_split_with_many_classes(splits, glyph_run):
    """Half the characters test, half train; data.val_classes (0.1 by default) of the training half
    held out as val."""
    train, val, test = ({label for label, _, _ in splits[s]} for s in ("train", "val", "test"))
    assert not train & test and not val & test and not train & val, "a character is in two splits"
    assert len(test) >= 1000 and abs(len(train) + len(val) - len(test)) <= 1
    assert len(val) == round(0.1 * (len(train) + len(val)))
    summary = json.loads((glyph_run / "shards" / "summary.json").read_text())
    assert summary["splits"]["test"]["classes"] == len(test)
    assert summary["splits"]["test"]["images"] == len(splits["test"])
    assert summary["splits"]["train"]["images_per_class"]["min"] >= 8


def test_every_class_has_min_fonts_and_every_image_ink(splits):
    for split, samples in splits.items():
        fonts = defaultdict(list)
        for label, meta, pixels in samples:
            assert meta["char"] == chr(label)
            fonts[label].append(meta["font"])
            assert pixels.shape == (32, 32) and pixels.var() > 0, f"blank image of {meta}"
            assert pixels.min() < 200 and pixels.max() == 255, f"no glyph drawn for {meta}"  # ink on white (hairlines grey)
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            assert border.min() > 128, f"{meta} is cut by the image's edge"
        for label, names in fonts.items():
            assert len(set(names)) == len(names) >= 8, f"{chr(label)!r} in {split}: fonts {names}"


def test_cmap_entries_that_draw_another_character_are_left_out(splits):
    """matplotlib's Computer Modern files map TeX's encodings onto ASCII: cmsy10's 'a' is a turnstile,
    '1' an infinity sign; cmmi10's '=' is a slash. And a glyph shared by Latin A and Greek Alpha
    (one outline) belongs to 'A' only: in those fonts Alpha would be indistinguishable."""
    fonts = {chr(label): set() for s in splits.values() for label, _, _ in s}
    for samples in splits.values():
        for label, meta, _ in samples:
            fonts[chr(label)].add(meta["font"])
    assert "cmsy10" not in fonts["a"] | fonts["1"] and "cmmi10" not in fonts["="]
    assert {"cmr10", "cmsy10", "DejaVu Sans Book"} <= fonts["A"]  # cmsy10's A is a calligraphic A
    assert "DejaVu Sans Book" not in fonts.get("\u0391", set())  # Greek Alpha


@pytest.mark.slow  # 44 s: the glyph set generated again at other worker counts
def test_same_seed_same_bytes_whatever_the_workers(glyph_run, tmp_path):
    run_pipeline("stage=shard", "data=glyphs", "data.shard_workers=2", f"run_dir={tmp_path}")
    files = sorted(p.relative_to(glyph_run / "shards") for p in (glyph_run / "shards").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "shards") for p in (tmp_path / "shards").rglob("*") if p.is_file())
    for f in files:
        assert (glyph_run / "shards" / f).read_bytes() == (tmp_path / "shards" / f).read_bytes(), f


def test_another_seed_splits_and_jitters_differently():
    cfg = DataConfig(name="glyphs", image_size=16, min_fonts=20)  # a few hundred classes: quick
    images = []
    for seed in (0, 1):
        splits = convert(cfg, seed)
        images.append({(r.label, r.meta["font"]): (split, np.asarray(r.image)) for split, records in splits.items()
                       for r in records})
    assert images[0].keys() == images[1].keys()
    test = [{label for label, _ in found if found[label, _][0] == "test"} for found in images]
    assert test[0] != test[1] and abs(len(test[0]) - len(test[1])) <= 1
    moved = [not np.array_equal(images[0][k][1], images[1][k][1]) for k in images[0]]
    assert np.mean(moved) > 0.95, "the jitter does not depend on the seed"


def test_identical_fonts_add_nothing(tmp_path):
    """A copy of a bundled font, renamed, draws every glyph as the original does: no new images."""
    source = glyphs.font_files(DataConfig(name="glyphs"))[0]
    font = TTFont(source)
    for record in font["name"].names:
        record.string = record.toUnicode().replace("DejaVu", "Copy of DejaVu")
    font.save(tmp_path / "copy.ttf")
    base = glyphs.drawn(glyphs.load_faces(glyphs.font_files(DataConfig(name="glyphs"))), 16, 8)
    faces = glyphs.load_faces(glyphs.font_files(DataConfig(name="glyphs", font_dirs=[str(tmp_path)])))
    assert any(f.name.startswith("Copy of") for f in faces)
    assert glyphs.drawn(faces, 16, 8) == base


@pytest.mark.skipif(not (SYSTEM_DEJAVU / "DejaVuSansCondensed.ttf").is_file(), reason="needs Debian's fonts-dejavu")
def test_font_dirs_add_typefaces(tmp_path):
    shutil.copy(SYSTEM_DEJAVU / "DejaVuSansCondensed.ttf", tmp_path)
    faces = glyphs.load_faces(glyphs.font_files(DataConfig(name="glyphs", font_dirs=[str(tmp_path)])))
    classes = glyphs.drawn(faces, 16, 8)
    assert sum("DejaVu Sans Condensed" in (f.name for f in drawers) for drawers in classes.values()) > 1000


def test_bad_settings_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        convert(DataConfig(name="glyphs", font_dirs=[str(tmp_path / "missing")]), seed=0)
    with pytest.raises(UserError, match="no .ttf"):
        convert(DataConfig(name="glyphs", font_dirs=[str(tmp_path)]), seed=0)
    with pytest.raises(UserError, match="min_fonts"):
        convert(DataConfig(name="glyphs", min_fonts=1000), seed=0)


def test_font_ranges_that_do_not_overlap_give_disjoint_classes():
    """data.max_fonts: characters drawn by 8 to 11 fonts and those drawn by 12 or more are two sets of
    classes with nothing in common (an encoder pretrained on one is tested on the other)."""
    faces = glyphs.load_faces(glyphs.font_files(DataConfig(name="glyphs")))
    low, high, every = (glyphs.drawn(faces, 16, lo, hi) for lo, hi in ((8, 11), (12, None), (8, None)))
    assert low and high and not low.keys() & high.keys()
    assert low.keys() | high.keys() == every.keys()
    assert all(8 <= len(f) <= 11 for f in low.values()) and all(len(f) >= 12 for f in high.values())
    with pytest.raises(UserError, match="max_fonts"):
        load_config(["data=glyphs", "data.min_fonts=8", "data.max_fonts=7"])
