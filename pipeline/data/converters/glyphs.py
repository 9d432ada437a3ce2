"""Glyphs: an open-set dataset of thousands of classes with no download.

A class is one Unicode character; an image is that character drawn by one typeface, so queries and
gallery are the same character in other typefaces. The fonts are those matplotlib ships (DejaVu
Sans/Serif/Mono in their weights and slants, STIX, Computer Modern), plus any folder of font files
in data.font_dirs (e.g. Debian's fonts-noto-cjk, for thousands of CJK classes).

What counts as "a font draws this character", checked on the glyph and on its pixels, not only on
the cmap:
- the character is visible: a letter, number, punctuation or symbol (no marks, spaces, controls,
  private use);
- the glyph's name does not say it is another character (the Computer Modern files map TeX's own
  encodings onto ASCII: cmsy10's "a" is a turnstile, cmmi10's "=" a slash);
- its rendering has ink and differs from the font's .notdef box;
- within a font, a rendering shared by several characters (Latin A, Greek Alpha, Cyrillic A drawn
  by one outline) belongs only to the lowest code point: the others would be indistinguishable;
- within a class, identical renderings count once (the same typeface installed twice).
A character is a class when at least data.min_fonts (and at most data.max_fonts) fonts draw it: two
ranges that do not overlap give disjoint sets of classes (e.g. 4 to 7 fonts to pretrain an encoder
on, 8 or more for the benchmark: tools/study_glyphs.py). Classes are split
class-disjointly by a seeded data.test_fraction. Each image is rendered once, here, supersampled
and reduced to data.image_size, centred on the font's own middle (so baseline and height, which
tell "." from "·" and "o" from "O", are kept), with a seeded jitter of scale and position.
"""
from __future__ import annotations

import hashlib
import logging
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
from fontTools import agl
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import DataConfig
from pipeline.data.converters import Record, split_classes
from pipeline.errors import UserError

log = logging.getLogger(__name__)

FONT_EXTENSIONS = {".ttf", ".otf", ".ttc", ".otc"}
# Not typefaces of ordinary characters: LastResort draws a placeholder per Unicode block; the STIX
# size variants and cmex10 hold only large delimiters at fixed sizes.
EXCLUDED = ("LastResort", "STIXSiz", "cmex10")
VISIBLE = ("L", "N", "P", "S")      # Unicode general categories kept: letters, numbers, punctuation, symbols
SUPERSAMPLE = 4                     # render at 4x the image side, then reduce (anti-aliased)
EM = 0.7                            # font size as a share of the image side
SCALE_JITTER = 0.1                  # each image: glyph scale x U(0.9, 1.1)
SHIFT_JITTER = 0.06                 # each image: centre moved by U(-0.06, 0.06) of the side, per axis
NOTDEF_PROBE = "\U0010fffd"         # a private-use code point no font maps: renders the .notdef glyph


@dataclass(frozen=True)
class Face:
    path: Path
    index: int                      # face number inside a .ttc/.otc collection
    name: str                       # full name, e.g. "DejaVu Sans Bold"

    @property
    def seed(self) -> int:
        """Per-font part of an image's jitter seed: from the name, so adding fonts changes no other image."""
        return zlib.crc32(self.name.encode())

    def font(self, size: int) -> ImageFont.FreeTypeFont:
        return ImageFont.truetype(str(self.path), size, index=self.index, layout_engine=ImageFont.Layout.BASIC)


def font_files(cfg: DataConfig) -> list[Path]:
    """matplotlib's bundled fonts, then every font file under data.font_dirs, each list sorted."""
    bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    folders = [bundled]
    for d in cfg.font_dirs:
        folder = Path(d).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.font_dirs: {d} is not a folder; give folders of .ttf/.otf/.ttc files "
                            f"(e.g. /usr/share/fonts after apt-get install fonts-noto-cjk)")
        folders.append(folder)
    files = []
    for folder in folders:
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_EXTENSIONS and p.is_file())
        if not found:
            raise UserError(f"data.font_dirs: {folder} holds no .ttf/.otf/.ttc font files")
        files += [p for p in found if not p.name.startswith(EXCLUDED)]
    return files


def _tables(path: Path) -> list[TTFont]:
    if path.suffix.lower() in (".ttc", ".otc"):
        return list(TTCollection(str(path), lazy=True).fonts)
    return [TTFont(str(path), lazy=True)]


def _name_says(code: int, glyph_name: str) -> bool | None:
    """Whether the glyph's name (Adobe Glyph List) is the character the cmap maps to it; None: it does not say."""
    named = agl.toUnicode(glyph_name)
    if not named or (len(named) == 1 and unicodedata.category(named) == "Co"):
        return None  # an unknown name, or AGL's legacy private-use alias (e.g. oldstyle digits)
    norm = lambda s: unicodedata.normalize("NFKD", s)  # noqa: E731  (Ohm sign = Omega, ligatures)
    return norm(named) == norm(chr(code))


def visible_characters(table: TTFont) -> list[int]:
    """The visible characters a font's cmap claims, less those its glyph names contradict. A font that
    contradicts its cmap anywhere (a TeX encoding) is not trusted where a name says nothing either."""
    said = {code: _name_says(code, glyph) for code, glyph in (table.getBestCmap() or {}).items()
            if unicodedata.category(chr(code))[0] in VISIBLE}
    trusted = (True,) if False in said.values() else (True, None)
    return sorted(code for code, verdict in said.items() if verdict in trusted)


def load_faces(files: list[Path]) -> dict[Face, list[int]]:
    """Each distinct typeface (by full name; the first file wins) -> the visible characters its cmap claims."""
    faces: dict[Face, list[int]] = {}
    names = set()
    for path in files:
        try:
            for index, table in enumerate(_tables(path)):
                name = table["name"].getBestFullName() or f"{path.stem}#{index}"
                if name not in names:
                    face = Face(path, index, name)
                    face.font(12)  # FreeType reads it too
                    faces[face] = visible_characters(table)
                    names.add(name)
        except Exception as e:  # a broken font file is skipped, never fatal
            log.warning("glyphs: skipping unreadable font %s: %s: %s", path, type(e).__name__, e)
    return faces


def render(font: ImageFont.FreeTypeFont, char: str) -> tuple[tuple[int, int, int, int], Image.Image] | None:
    """The glyph's ink, tight: (box relative to the font's middle anchor, grey image, 255 = ink), or None."""
    box = font.getbbox(char, anchor="mm")
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    ink = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    ImageDraw.Draw(ink).text((-box[0], -box[1]), char, font=font, fill=255, anchor="mm")
    return (box, ink) if ink.getbbox() else None


def _fingerprint(font: ImageFont.FreeTypeFont, char: str) -> bytes | None:
    """A digest of the glyph's rendering (its ink and where it sits); None when it has no ink."""
    glyph = render(font, char)
    if glyph is None:
        return None
    box, ink = glyph
    return hashlib.blake2b(repr(box).encode() + ink.tobytes(), digest_size=16).digest()


def drawn(faces: dict[Face, list[int]], size: int, min_fonts: int, max_fonts: int | None = None) -> dict[int, list[Face]]:
    """Character -> the faces that really draw it, distinctly (see the module docstring); from min_fonts
    to max_fonts (None: any number above) of them."""
    renders: dict[int, dict[bytes, Face]] = {}  # character -> rendering -> the first face that draws it so
    for face, codes in faces.items():
        font = face.font(round(EM * size * SUPERSAMPLE))
        notdef = _fingerprint(font, NOTDEF_PROBE)
        # Every code the face claims is drawn, whatever min_fonts: who owns a rendering does not depend on
        # it, so two font ranges give disjoint classes.
        owner: dict[bytes, int] = {}  # rendering -> lowest code point drawn so by this face
        for code in codes:
            fingerprint = _fingerprint(font, chr(code))
            if fingerprint is not None and fingerprint != notdef:
                owner.setdefault(fingerprint, code)  # codes ascend: the first is the lowest
        for fingerprint, code in owner.items():
            renders.setdefault(code, {}).setdefault(fingerprint, face)
    return {code: list(by_render.values()) for code, by_render in sorted(renders.items())
            if min_fonts <= len(by_render) <= (max_fonts or len(by_render))}


def jittered(face: Face, font: ImageFont.FreeTypeFont, code: int, size: int, seed: int) -> Image.Image:
    """One image: the glyph, black on white, centred with a seeded scale and shift, reduced to size x size."""
    box, ink = render(font, chr(code))
    rng = np.random.default_rng([seed, code, face.seed])
    scale = rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    shift = rng.uniform(-SHIFT_JITTER, SHIFT_JITTER, size=2)
    # The view, in supersampled pixels around the anchor; a glyph too large for it widens it, so that
    # no scale and shift of the jitter brings its ink within a pixel of the edge.
    reach = max(abs(v) for v in box) + 1.5 * SUPERSAMPLE
    side = max(size * SUPERSAMPLE, reach * (1 + SCALE_JITTER) / (0.5 - SHIFT_JITTER))
    view = side / scale
    centre = -shift * view
    half = int(np.ceil(view / 2 + np.abs(centre).max())) + 1  # a canvas holding the view, anchor at its middle
    canvas = Image.new("L", (2 * half, 2 * half), 255)
    canvas.paste(0, (half + box[0], half + box[1]), ink)
    x0, y0 = half + centre - view / 2
    return canvas.resize((size, size), Image.BOX, box=(x0, y0, x0 + view, y0 + view))  # area average


def _records(classes: dict[int, list[Face]], size: int, seed: int) -> Iterator[Record]:
    """The images of `classes`, font by font (one font loaded at a time), in a fixed order."""
    drawn_by: dict[Face, list[int]] = {}
    for code, drawers in classes.items():
        for face in drawers:
            drawn_by.setdefault(face, []).append(code)
    for number, face in enumerate(sorted(drawn_by, key=lambda f: (str(f.path), f.index))):
        font = face.font(round(EM * size * SUPERSAMPLE))
        for code in drawn_by[face]:
            yield Record(key=f"u{code:06x}_f{number:03d}", label=code, image=jittered(face, font, code, size, seed),
                         meta={"char": chr(code), "font": face.name})


def convert(cfg: DataConfig, seed: int) -> dict[str, Iterator[Record]]:
    if cfg.min_fonts < 2:
        raise UserError(f"data.min_fonts={cfg.min_fonts}: a class needs at least 2 fonts (a query and a match)")
    faces = load_faces(font_files(cfg))
    classes = drawn(faces, cfg.image_size, cfg.min_fonts, cfg.max_fonts)
    if len(classes) < 2:
        limit = "" if cfg.max_fonts is None else f" to data.max_fonts={cfg.max_fonts}"
        raise UserError(f"only {len(classes)} character(s) are drawn by data.min_fonts={cfg.min_fonts}{limit} fonts; "
                        f"widen that range or add fonts with data.font_dirs")
    test = split_classes(cfg, list(classes), seed)
    counts = [len(f) for f in classes.values()]
    log.info("glyphs: %d fonts, %d characters drawn by %d to %s of them (%d test), %d-%d fonts per class (mean %.1f)",
             len(faces), len(classes), cfg.min_fonts, cfg.max_fonts or "all", len(test), min(counts), max(counts),
             np.mean(counts))
    return {split: _records({c: f for c, f in classes.items() if (c in test) == (split == "test")}, cfg.image_size, seed)
            for split in ("train", "test")}
