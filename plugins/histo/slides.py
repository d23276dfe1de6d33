"""Whole-slide access: open a slide, know its µm/px, read a tile at a target µm/px.

OpenSlide reads the scanner formats (SVS, NDPI, MRXS, SCN, generic tiled TIFF...); a plain image
(PNG, JPEG, a non-pyramidal TIFF) falls back to a one-level slide. Coordinates are always level-0
pixels; a tile of ``tile_size`` pixels at ``mpp`` µm/px covers ``tile_size_level0`` level-0 pixels,
so slides scanned at 40x and 20x give tiles of the same physical size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainfm.data import image_info, read_csv_rows
from domainfm.errors import DomainFMError

# extensions OpenSlide opens, and plain images read through Pillow
# (a DICOM slide is a folder of .dcm files: give one of its files explicitly)
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CM_PER_UNIT = {"centimeter": 1.0, "inch": 2.54}
# µm per pixel a microscope slide scan can have: 0.05 (beyond a 100x oil objective) to 20 (a 0.5x
# overview). A file value outside is a placeholder, not a measurement: 72 or 300 dpi written by a
# converter is 353 or 85 µm/px, 1 pixel per unit is 10,000 or 25,400. Such values count as unknown.
MPP_RANGE = (0.05, 20.0)
# not a value to paste: the scanner's µm/px differs from slide to slide (its objective, its camera)
SLIDE_MPP_FIX = ("pass --slide-mpp with the scanner's µm per pixel (0.25 at 40x, 0.5 at 20x; see the scanner's "
                 "report), or --slide-mpp CSV with columns slide_id,mpp")


def slide_id(path: str | Path) -> str:
    """The slide's name without its last extension (TCGA ids contain dots, so only one is cut)."""
    return Path(path).stem


def find_slides(inputs: list[str] | tuple[str, ...]) -> list[Path]:
    """Slide files from a mix of files and folders (folders are searched one level deep, sorted)."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += sorted(q for q in p.iterdir()
                            if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS + IMAGE_EXTENSIONS)
        elif p.is_file():
            if p.suffix.lower() not in SLIDE_EXTENSIONS + IMAGE_EXTENSIONS and not _openslide_vendor(p):
                # refused before any output exists: a CSV or .h5 given among the slides is a typo
                raise DomainFMError(f"is not a slide ({p.suffix or 'no extension'}: neither a whole-slide format "
                                    "OpenSlide recognises nor an image)", path=p,
                                    fix=f"give slide files ({', '.join(SLIDE_EXTENSIONS)}) or images "
                                        f"({', '.join(IMAGE_EXTENSIONS)}), or folders of them")
            found.append(p)
        else:
            raise DomainFMError("no such slide file or folder", path=p, fix="check the path")
    if not found:
        raise DomainFMError(f"no slides found in {', '.join(map(str, inputs))}",
                            fix=f"give slide files or folders holding {', '.join(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS)}")
    ids: dict[str, Path] = {}
    for p in found:
        if slide_id(p) in ids:
            raise DomainFMError(f"two slides share the id {slide_id(p)!r} ({ids[slide_id(p)]} and {p})",
                                path=p, fix="rename one of them: outputs are named by slide id")
        ids[slide_id(p)] = p
    return found


def _openslide_vendor(path: Path) -> str | None:
    """The slide format OpenSlide recognises in ``path`` by its content (None: none)."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def open_slide(path: str | Path):
    """An ``openslide.OpenSlide``, or an ``openslide.ImageSlide`` for a plain image."""
    import openslide

    path = Path(path)
    if not path.is_file():
        raise DomainFMError("slide file not found", path=path, fix="check the path")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as e:
        raise DomainFMError(f"OpenSlide cannot read this slide ({e})", path=path,
                            fix="re-export or re-download the slide; the file is damaged") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not in the middle of tiling
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DomainFMError(f"not a slide OpenSlide reads nor an image Pillow decodes ({e})", path=path,
                            fix="check that the file is complete (truncated downloads fail like this)") from None
    # OpenSlide's ImageSlide converts to 8-bit RGBA, which clips 16-bit and float images to white
    info = image_info(path)
    if info.dtype != "uint8":
        raise DomainFMError(f"is a {info.dtype} image with {info.bands} band(s); slides are read as 8-bit RGB "
                            "(brightfield), and converting it would clip its values", path=path,
                            fix="scale it to an 8-bit RGB image first (or give the brightfield scan)")
    return openslide.ImageSlide(str(path))


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    path = Path(path)
    out: dict[str, float] = {}
    for row in read_csv_rows(path, ("slide_id", "mpp"), what="--slide-mpp CSV",
                             fix="add a header line `slide_id,mpp`"):
        try:
            out[row["slide_id"]] = float(row["mpp"])
        except ValueError:
            raise DomainFMError(f"mpp {row['mpp']!r} of slide {row['slide_id']!r} is not a number",
                                path=path, fix="write µm per pixel as a decimal number") from None
    return out


def parse_slide_mpp(value: str | None) -> float | dict[str, float] | None:
    """``--slide-mpp``: a number for every slide, or a CSV of slide_id,mpp."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    if not Path(value).is_file():
        raise DomainFMError(f"--slide-mpp {value!r} is neither a number nor an existing CSV file",
                            fix=SLIDE_MPP_FIX)
    return read_mpp_csv(value)


def file_mpp(props) -> tuple[float | None, str]:
    """µm/px a slide's file states, and where it comes from: OpenSlide's ``openslide.mpp-x`` (the
    vendor's value), else the TIFF resolution tags. ``(None, "")`` when it states none; the value
    is returned even when it is outside :data:`MPP_RANGE` (see :func:`mpp_from_properties`)."""
    tags, tag_source = None, ""
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    res = props.get("tiff.XResolution")
    if unit in _CM_PER_UNIT and res:
        try:
            px_per_unit = float(res)
        except ValueError:
            px_per_unit = 0.0
        if px_per_unit > 0:
            tags, tag_source = _CM_PER_UNIT[unit] * 1e4 / px_per_unit, f"TIFF resolution {px_per_unit:g} px/{unit}"
    mpp = props.get("openslide.mpp-x")
    if mpp:
        try:
            value = float(mpp)
        except ValueError:
            value = 0.0
        if value > 0:
            # OpenSlide derives mpp-x from the TIFF tags of generic TIFFs: name the tags then
            same = tags is not None and abs(tags - value) <= 1e-6 * value
            return value, tag_source if same else "openslide.mpp-x"
    return tags, tag_source


def plausible_mpp(value: float | None) -> bool:
    return value is not None and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def mpp_from_properties(props) -> float | None:
    """µm/px of a slide from its file (:func:`file_mpp`), or None when the file states none or a
    value outside the range of microscopy (:data:`MPP_RANGE`: placeholder dpi, inch units)."""
    value, _ = file_mpp(props)
    return value if plausible_mpp(value) else None


def notice(message: str) -> None:
    """One line on stderr that tells the user what the run decided for them."""
    import sys

    print(f"note: {message}", file=sys.stderr, flush=True)


def resolve_slide_mpp(slide, path: str | Path, override: float | dict[str, float] | None) -> float:
    """The slide's µm/px: an explicit ``--slide-mpp`` (a number, or this slide's row of a CSV)
    beats the file and says so when the file disagrees; else the file's value when plausible;
    else a one-line error naming ``--slide-mpp``."""
    value, source = file_mpp(slide.properties)
    given = override.get(slide_id(path)) if isinstance(override, dict) else override
    if given is not None:
        given = float(given)
        if not plausible_mpp(given):
            raise DomainFMError(f"--slide-mpp {given:g} is outside the µm/px of microscopy "
                                f"({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g})", path=path,
                                fix="give the scan's µm per pixel (0.25 at 40x, 0.5 at 20x)")
        if value is not None and abs(value - given) > 1e-3 * given:
            what = "a placeholder outside microscopy's range" if not plausible_mpp(value) else "overridden"
            notice(f"{path}: --slide-mpp {given:g} µm/px used; the file says {value:.4g} µm/px "
                   f"({source}, {what})")
        return given
    if plausible_mpp(value):
        return value
    if value is not None:
        raise DomainFMError(f"the file's {value:.4g} µm/px ({source}) is outside the µm/px of microscopy "
                            f"({MPP_RANGE[0]:g}-{MPP_RANGE[1]:g}): a placeholder, not the scan's", path=path,
                            fix=SLIDE_MPP_FIX)
    raise DomainFMError("the slide has no µm/px (no openslide.mpp-x, no TIFF resolution tags)",
                        path=path, fix=SLIDE_MPP_FIX)


@dataclass(frozen=True)
class TileGeometry:
    """How a tile at ``mpp`` µm/px is read from a slide scanned at ``slide_mpp``."""

    slide_mpp: float
    mpp: float
    tile_size: int           # output pixels
    tile_size_level0: int    # level-0 pixels covered by one tile
    level: int               # pyramid level read from
    level_downsample: float
    read_size: int           # pixels read at ``level`` (then resized to tile_size)


def choose_level(level_downsamples, slide_mpp: float, target_mpp: float) -> int:
    """The coarsest level still at least as fine as the target (never upsample a coarser level)."""
    best = 0
    for i, ds in enumerate(level_downsamples):
        if slide_mpp * ds <= target_mpp * (1 + 1e-6):
            if ds > level_downsamples[best]:
                best = i
    return best


def tile_geometry(level_downsamples, slide_mpp: float, mpp: float, tile_size: int) -> TileGeometry:
    if mpp <= 0 or tile_size <= 0:
        raise DomainFMError(f"--mpp ({mpp}) and --tile-size ({tile_size}) must be positive")
    size0 = int(round(tile_size * mpp / slide_mpp))
    if size0 < 1:
        raise DomainFMError(f"a {tile_size}-pixel tile at {mpp} µm/px is under one pixel of this slide "
                            f"({slide_mpp} µm/px)", fix="raise --mpp or --tile-size")
    level = choose_level(level_downsamples, slide_mpp, mpp)
    ds = float(level_downsamples[level])
    return TileGeometry(slide_mpp, mpp, tile_size, size0, level, ds, max(1, int(round(size0 / ds))))


def footprint_geometry(level_downsamples, slide_mpp: float, size0: int, tile_size: int) -> TileGeometry:
    """The geometry of tiles that cover ``size0`` level-0 pixels (a coords file's own tile size),
    resized to ``tile_size``: their µm/px is ``size0 * slide_mpp / tile_size``."""
    if size0 < 1 or tile_size < 1:
        raise DomainFMError(f"tiles of {size0} level-0 px resized to {tile_size} px are not possible",
                            fix="check the coords file and --tile-size")
    mpp = size0 * slide_mpp / tile_size
    level = choose_level(level_downsamples, slide_mpp, mpp)
    ds = float(level_downsamples[level])
    return TileGeometry(slide_mpp, mpp, tile_size, int(size0), level, ds, max(1, int(round(size0 / ds))))


def on_white(region):
    """RGB of an OpenSlide RGBA region, transparent pixels (outside the scan) white as on glass.

    Most regions are fully opaque: then the compositing is skipped, it costs as much as the read.
    """
    from PIL import Image

    if region.mode == "RGBA" and region.getchannel("A").getextrema()[0] < 255:
        region = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
    return region.convert("RGB")


def resize_tile(region, tile_size: int):
    """Down to ``tile_size``: a box average for whole factors (exact area mean, and the fastest),
    bilinear with antialiasing otherwise."""
    from PIL import Image

    size = region.size[0]
    if size == tile_size:
        return region
    if size > tile_size and size % tile_size == 0:
        return region.reduce(size // tile_size)
    return region.resize((tile_size, tile_size), Image.Resampling.BILINEAR)


def read_tile(slide, x: int, y: int, geom: TileGeometry, path: str | Path | None = None) -> np.ndarray:
    """RGB uint8 [tile_size, tile_size, 3] of the tile whose top-left level-0 corner is (x, y).

    Raises DomainFMError (naming ``path``) when OpenSlide cannot decode the tile (damaged JPEG data)."""
    import openslide

    try:
        region = slide.read_region((int(x), int(y)), geom.level, (geom.read_size, geom.read_size))
    except openslide.OpenSlideError as e:
        raise DomainFMError(f"OpenSlide cannot decode the tile at level-0 ({int(x)}, {int(y)}), level {geom.level} "
                            f"({e})", path=path,
                            fix="re-export or re-download the slide (its image data is damaged), or leave it "
                                "out of this run") from None
    # np.array, not np.asarray: Pillow's buffer is read-only and torch wants writable arrays
    if geom.read_size == geom.tile_size and region.mode == "RGBA":
        rgba = np.array(region)
        if rgba[..., 3].min() == 255:  # opaque, no resize: the RGB view, no further copy
            return rgba[..., :3]
    return np.array(resize_tile(on_white(region), geom.tile_size))


def thumbnail(slide, max_size: int = 1024, min_size: int = 512) -> tuple[np.ndarray, float]:
    """RGB thumbnail [h, w, 3] and its downsample from level 0 (same in x and y up to rounding).

    Read from the coarsest pyramid level whose longer side is still at least ``min_size``
    (decoding a finer level costs as much as hundreds of tiles), scaled down to ``max_size``.
    """
    from PIL import Image

    w0, h0 = slide.dimensions
    level = 0
    for i, (w, h) in enumerate(slide.level_dimensions):
        if max(w, h) >= min(min_size, max(w0, h0)):
            level = i
    img = on_white(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    if max(img.size) > max_size:
        scale = max_size / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.Resampling.BILINEAR)
    return np.asarray(img), w0 / img.size[0]
