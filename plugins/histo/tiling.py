"""Cut a slide into tissue tiles at a fixed µm/px and save the coordinates (``histo tile``).

Output per slide, in the layout CLAM and TRIDENT read:
- ``coords/<slide_id>.h5``: dataset ``coords`` [N, 2] int64 (level-0 x, y of each tile's top-left corner)
  with attrs ``mpp``, ``tile_size``, ``tile_size_level0``, ``slide_mpp``, ``level``, ``patch_level`` (0),
  ``patch_size`` (= tile_size_level0), ``slide_path``, ``domainfm_version``;
- ``thumbnails/<slide_id>.png``: the thumbnail with the tissue mask tinted and the kept tiles outlined.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from plugins.histo import slides as slides_mod
from plugins.histo.tissue import tile_tissue_fractions, tissue_mask

DEFAULT_MPP = 0.5
DEFAULT_TILE_SIZE = 224
DEFAULT_MIN_TISSUE = 0.6


@dataclass
class TileSet:
    slide_id: str
    slide_path: Path
    coords: np.ndarray            # [N, 2] int64 level-0 (x, y)
    geometry: slides_mod.TileGeometry
    thumbnail: np.ndarray         # [h, w, 3] uint8
    mask: np.ndarray              # [h, w] bool, tissue
    thumb_downsample: float       # level-0 pixels per thumbnail pixel
    tissue_fraction: np.ndarray   # [N] of the kept tiles
    settings: dict = field(default_factory=dict)  # tissue settings (tissue_settings), as attrs

    def attrs(self) -> dict:
        from domainfm import __version__

        g = self.geometry
        return {"mpp": g.mpp, "tile_size": g.tile_size, "tile_size_level0": g.tile_size_level0,
                "slide_mpp": g.slide_mpp, "level": g.level, "patch_level": 0, "patch_size": g.tile_size_level0,
                "slide_path": str(Path(self.slide_path).resolve()), "domainfm_version": __version__,
                **self.settings}


def tissue_settings(min_tissue: float, max_tiles: int | None, seed: int,
                    slide_mpp: float | dict[str, float] | None = None) -> dict[str, Any]:
    """The tissue settings as HDF5 attrs (no None there): ``min_tissue``, ``max_tiles`` (0: every
    tissue tile), ``seed``, ``slide_mpp_setting`` (the ``--slide-mpp`` number, -1 for none or a
    per-slide CSV)."""
    return {"min_tissue": float(min_tissue), "max_tiles": int(max_tiles or 0), "seed": int(seed),
            "slide_mpp_setting": float(slide_mpp) if isinstance(slide_mpp, (int, float)) else -1.0}


def grid_coords(width: int, height: int, size0: int) -> np.ndarray:
    """Top-left level-0 corners of the non-overlapping tiles that fit inside the slide, row-major."""
    xs = np.arange(0, width - size0 + 1, size0, dtype=np.int64)
    ys = np.arange(0, height - size0 + 1, size0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def sample_tiles(n: int, max_tiles: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``max_tiles`` of ``n`` tiles, drawn without replacement, in original order."""
    if max_tiles is None or max_tiles <= 0 or n <= max_tiles:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_tiles, replace=False))


def tile_slide(path: str | Path, *, mpp: float = DEFAULT_MPP, tile_size: int = DEFAULT_TILE_SIZE,
               min_tissue: float = DEFAULT_MIN_TISSUE, max_tiles: int | None = None, seed: int = 0,
               slide_mpp: float | dict[str, float] | None = None, slide=None) -> TileSet:
    """Find the tissue tiles of one slide (reads only a thumbnail)."""
    path = Path(path)
    own = slide is None
    slide = slides_mod.open_slide(path) if own else slide
    try:
        smpp = slides_mod.resolve_slide_mpp(slide, path, slide_mpp)
        geom = slides_mod.tile_geometry(slide.level_downsamples, smpp, mpp, tile_size)
        thumb, ds = slides_mod.thumbnail(slide)
        mask = tissue_mask(thumb)
        coords = grid_coords(*slide.dimensions, geom.tile_size_level0)
        frac = tile_tissue_fractions(mask, coords[:, 0], coords[:, 1], geom.tile_size_level0, ds)
        keep = np.flatnonzero(frac >= min_tissue)
        keep = keep[sample_tiles(len(keep), max_tiles, seed)]
        return TileSet(slides_mod.slide_id(path), path, coords[keep], geom, thumb, mask, ds, frac[keep],
                       tissue_settings(min_tissue, max_tiles, seed, slide_mpp))
    finally:
        if own:
            slide.close()


def temporary_path(path: Path) -> Path:
    """A sibling name for writing ``path`` first: a crash leaves no half file under the real name."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def coords_path(out_dir: str | Path, sid: str) -> Path:
    return Path(out_dir) / "coords" / f"{sid}.h5"


def thumbnail_path(out_dir: str | Path, sid: str) -> Path:
    return Path(out_dir) / "thumbnails" / f"{sid}.png"


def write_coords(tiles: TileSet, out_dir: str | Path) -> Path:
    import h5py

    target = coords_path(out_dir, tiles.slide_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=tiles.coords.astype(np.int64))
            f.create_dataset("tissue_fraction", data=tiles.tissue_fraction.astype(np.float32))
            f.attrs.update(tiles.attrs())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_outputs(tiles: TileSet, out_dir: str | Path) -> tuple[Path, Path]:
    """The slide's thumbnail and coords file, both or neither: a slide that fails part-way leaves
    no output of its own behind (not even one from an earlier run, which no longer matches)."""
    try:
        thumb = write_thumbnail(tiles, out_dir)
        return write_coords(tiles, out_dir), thumb
    except BaseException:
        remove_outputs(out_dir, tiles.slide_id)
        raise


def remove_outputs(out_dir: str | Path, sid: str) -> None:
    """Remove a slide's coords and thumbnail (after it failed in this run); never raises, so the
    slide's own error is the one reported."""
    for p in (coords_path(out_dir, sid), thumbnail_path(out_dir, sid)):
        try:
            if p.is_file() or p.is_symlink():
                p.unlink()
        except OSError:
            pass


def h5_attrs(obj) -> dict[str, Any]:
    """Attributes of an h5py file or dataset as they are: numpy scalars become Python numbers,
    bytes become text, arrays stay arrays (CLAM writes ``downsample`` and ``level_dim`` as arrays
    of two)."""
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, (bytes, np.bytes_)):
            value = bytes(value).decode("utf-8", "replace")
        elif isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[key] = value
    return out


def read_coords(path: str | Path) -> tuple[np.ndarray, dict]:
    """Coordinates [N, 2] int64 and attrs of a coords HDF5 file: ours, CLAM's (attrs on the
    ``coords`` dataset) or TRIDENT's (attrs on the file); the file's attrs win where both have one."""
    import h5py

    from domainfm.errors import DomainFMError

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][:], np.int64)
            attrs = {**h5_attrs(f["coords"]), **h5_attrs(f)}
    except (OSError, KeyError) as e:
        raise DomainFMError(f"not a coords HDF5 file with a `coords` dataset ({e})", path=path,
                            fix="make it with `domainfm histo tile`") from None
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise DomainFMError(f"`coords` must be [N, 2] level-0 (x, y), got shape {coords.shape}", path=path,
                            fix="make it with `domainfm histo tile`")
    return coords[:, :2], attrs


def _scalar(value) -> float | None:
    """A number from an attr that may be an array (CLAM's ``downsample`` is [dx, dy])."""
    arr = np.asarray(value, np.float64).ravel()
    return float(arr[0]) if arr.size else None


def coords_footprint(attrs: dict[str, Any], level_downsamples) -> tuple[int, str] | None:
    """Level-0 pixels one tile of a coords file covers, and which attrs say so, or None when the
    file does not say. Ours and TRIDENT's: ``tile_size_level0`` / ``patch_size_level0``; CLAM's:
    ``patch_size`` pixels at ``patch_level`` (times that level's downsample)."""
    from domainfm.errors import DomainFMError

    for key in ("tile_size_level0", "patch_size_level0"):
        if key in attrs:
            return int(round(_scalar(attrs[key]))), key
    if "patch_size" in attrs:
        level = int(_scalar(attrs.get("patch_level", 0)) or 0)
        if level == 0:
            ds = 1.0
        elif "downsample" in attrs:
            ds = _scalar(attrs["downsample"])
        elif level < len(level_downsamples):
            ds = float(level_downsamples[level])
        else:
            raise DomainFMError(f"the coords were made at pyramid level {level}, which this slide does not have",
                                fix="re-tile this slide")
        return int(round(_scalar(attrs["patch_size"]) * ds)), f"patch_size at patch_level {level}"
    return None


def render_thumbnail(tiles: TileSet, *, tint=(0, 160, 0), outline=(20, 20, 200)) -> "Image.Image":  # noqa: F821
    """The thumbnail with the tissue mask tinted green and each kept tile outlined."""
    from PIL import Image, ImageDraw

    img = tiles.thumbnail.astype(np.float32)
    img[tiles.mask] = 0.7 * img[tiles.mask] + 0.3 * np.asarray(tint, np.float32)
    im = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    side = max(1.0, tiles.geometry.tile_size_level0 / tiles.thumb_downsample)  # a tile under a thumbnail pixel: one pixel
    for x, y in tiles.coords:
        x0, y0 = x / tiles.thumb_downsample, y / tiles.thumb_downsample
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], outline=outline)
    return im


def write_thumbnail(tiles: TileSet, out_dir: str | Path) -> Path:
    target = thumbnail_path(out_dir, tiles.slide_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        render_thumbnail(tiles).save(tmp, format="PNG", compress_level=1)  # fast; it is a preview
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
