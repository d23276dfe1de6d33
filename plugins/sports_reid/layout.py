"""Player re-identification folders: the two layouts and their file names, read without torch so
that bad input is reported before any heavy import (the datasets are in ``datasets.py``).

Layouts (found from the folders under ``--data``):

- MMSports 2022 (DeepSportradar): ``reid_training/*.jpeg``, ``reid_test/{query,gallery}/*.jpeg``,
  ``reid_challenge/{query,gallery}/*.jpeg``. Training and test names are
  ``<player_id>_<sequence>_<frame>.jpeg``; challenge names are anonymous integers.
- generic: ``train/<player_id>/*.jpg``, ``query/<player_id>/*.jpg``, ``gallery/<player_id>/*.jpg``;
  a ``c<k>`` token in a file name (Market-1501 style, e.g. ``0002_c1s1_000451_03.jpg`` or
  ``c2_f017.jpg``) is its camera id, which turns on the same-camera exclusion of the evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from domainfm.errors import DomainFMError, expect_folder

MMSPORTS_NAME = re.compile(r"^(?P<pid>\d+)_(?P<sequence>\d+)_(?P<frame>\d+)$")
CHALLENGE_NAME = re.compile(r"^\d+$")
CAMERA_TOKEN = re.compile(r"(?:^|[_\-])c(\d+)", re.IGNORECASE)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT_FIX = ("give --data the folder holding reid_training/ and reid_test/ (MMSports 2022) "
              "or train/, query/ and gallery/ (generic)")
# the folders of each layout, per part
MMSPORTS_DIRS = {"train": "reid_training", "test_query": "reid_test/query", "test_gallery": "reid_test/gallery",
                 "challenge_query": "reid_challenge/query", "challenge_gallery": "reid_challenge/gallery"}
GENERIC_DIRS = {"train": "train", "test_query": "query", "test_gallery": "gallery"}
#: What a folder of crops given to ``predict`` (INPUT... or --gallery) may hold.
CROPS_LAYOUT = ("<player_id>/ sub-folders of .jpg/.jpeg/.png crops, crops named <player_id>_<sequence>_<frame>.jpeg "
                "(MMSports), or any crops (ranked without scores)")


def _part_layout(layout: str, part: str) -> str:
    """What the folder of ``part`` holds in ``layout``, for messages."""
    if layout == "mmsports":
        names = "<integer>.jpeg" if part.startswith("challenge") else "<player_id>_<sequence>_<frame>.jpeg"
        return f"{MMSPORTS_DIRS[part]}/ of {names} crops"
    return f"{GENERIC_DIRS[part]}/<player_id>/ sub-folders of .jpg/.jpeg/.png crops"


def _what_is_there(folder: Path) -> str:
    """What a folder without crops holds, for messages: empty, other files, empty sub-folders."""
    entries = sorted(folder.iterdir())
    if not entries:
        return "it is empty"
    files = [e.name for e in entries if e.is_file()]
    if files:
        return f"it holds {len(files)} other file(s), e.g. {files[0]}"
    return f"it holds only {len(entries)} sub-folder(s) without crops, e.g. {entries[0].name}/"


@dataclass(frozen=True)
class ReIDRecord:
    """One crop: its file, its player id ("" where unknown) and what its name tells."""

    path: Path
    pid: str
    item_id: str  # the name the submission CSV uses (file stem)
    camera: int | None = None
    sequence: int | None = None
    frame: int | None = None


# ------------------------------------------------------------------- layouts and file names

def detect_layout(root: str | Path) -> str:
    root = Path(root)
    expect_folder(root, "--data", missing="data folder not found", fix=LAYOUT_FIX)
    if (root / "reid_training").is_dir() or (root / "reid_test").is_dir() or (root / "reid_challenge").is_dir():
        return "mmsports"
    if any((root / d).is_dir() for d in ("train", "query", "gallery")):
        return "generic"
    raise DomainFMError("no re-identification layout found (neither reid_training/ nor train/)", path=root,
                        fix=LAYOUT_FIX)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def parse_mmsports_name(path: Path) -> ReIDRecord:
    """``<player_id>_<sequence>_<frame>.jpeg`` -> a record; anything else is a clear error."""
    m = MMSPORTS_NAME.match(path.stem)
    if m is None:
        raise DomainFMError("file name does not match <player_id>_<sequence>_<frame>.jpeg", path=path,
                            fix="rename it (e.g. 12_3_0.jpeg) or move it out of the folder")
    return ReIDRecord(path=path, pid=str(int(m["pid"])), item_id=path.stem, sequence=int(m["sequence"]),
                      frame=int(m["frame"]))


def parse_challenge_name(path: Path) -> ReIDRecord:
    if CHALLENGE_NAME.match(path.stem) is None:
        raise DomainFMError("challenge crops must be named by an integer (e.g. 17.jpeg)", path=path,
                            fix="rename it or move it out of reid_challenge/")
    return ReIDRecord(path=path, pid="", item_id=str(int(path.stem)))


def camera_of(path: Path) -> int | None:
    m = CAMERA_TOKEN.search(path.stem)
    return int(m.group(1)) if m else None


def part_folder(root: str | Path, layout: str, part: str) -> Path:
    dirs = MMSPORTS_DIRS if layout == "mmsports" else GENERIC_DIRS
    if part not in dirs:
        raise DomainFMError(f"the {layout} layout has no {part.replace('_', ' ')} split",
                            fix="use --split test (the challenge split exists only in the MMSports layout)")
    return Path(root) / dirs[part]


def read_part(root: str | Path, part: str, layout: str | None = None) -> list[ReIDRecord]:
    """The records of one part: ``train``, ``test_query``, ``test_gallery``, ``challenge_query``,
    ``challenge_gallery``. An empty or missing folder is an error naming it."""
    layout = layout or detect_layout(root)
    folder = part_folder(root, layout, part)
    expect_folder(folder, "--data", missing=f"{part.replace('_', ' ')} folder not found",
                  fix=f"the {'MMSports 2022' if layout == 'mmsports' else 'generic'} layout keeps it in "
                      f"{_part_layout(layout, part)}")
    if layout == "mmsports":
        files = _images(folder)
        parse = parse_challenge_name if part.startswith("challenge") else parse_mmsports_name
        records = [parse(p) for p in files]
    else:
        records = []
        stray = _images(folder)
        if stray:
            raise DomainFMError("images must sit in one sub-folder per player", path=stray[0],
                                fix=f"move it to {folder}/<player_id>/")
        for player_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            records += [ReIDRecord(path=p, pid=player_dir.name, item_id=f"{player_dir.name}/{p.stem}",
                                   camera=camera_of(p)) for p in _images(player_dir)]
        with_cam = [r.camera is not None for r in records]
        if any(with_cam) and not all(with_cam):
            bad = records[with_cam.index(False)].path
            raise DomainFMError("some file names carry a camera token (c<k>) and this one does not", path=bad,
                                fix="name every crop with its camera (e.g. c1_f000.jpg) or none of them")
    if not records:
        raise DomainFMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found: {_what_is_there(folder)}", path=folder,
                            fix=f"put the crops there ({_part_layout(layout, part)}), or point --data at the right "
                                "folder")
    return records


def read_eval_split(root: str | Path, split: str = "test") -> tuple[list[ReIDRecord], list[ReIDRecord]]:
    """(query, gallery) records of ``split`` ("test" or "challenge"). In the test split every
    query's player must appear in the gallery: otherwise its AP is undefined."""
    layout = detect_layout(root)
    query = read_part(root, f"{split}_query", layout)
    gallery = read_part(root, f"{split}_gallery", layout)
    if split == "test":
        gallery_ids = {r.pid for r in gallery}
        for r in query:
            if r.pid not in gallery_ids:
                raise DomainFMError(f"query player {r.pid} has no crop in the gallery", path=r.path,
                                    fix="add that player's gallery crops or remove the query")
        if layout == "generic" and (query[0].camera is None) != (gallery[0].camera is None):
            raise DomainFMError("cameras are named in only one of query/ and gallery/", path=Path(root),
                                fix="name the cameras (c<k>) in both or in neither")
    return query, gallery


# ------------------------------------------------------------------- loose crops (domainfm predict)

def _loose_record(path: Path, item_id: str) -> ReIDRecord:
    """A crop outside a training layout: its player id where its name gives one (MMSports
    ``<player_id>_<sequence>_<frame>``), its camera where a ``c<k>`` token names it."""
    m = MMSPORTS_NAME.match(path.stem)
    if m is not None:
        return ReIDRecord(path=path, pid=str(int(m["pid"])), item_id=item_id, camera=camera_of(path),
                          sequence=int(m["sequence"]), frame=int(m["frame"]))
    return ReIDRecord(path=path, pid="", item_id=item_id, camera=camera_of(path))


def read_crops(sources: list[str | Path], *, what: str = "query") -> list[ReIDRecord]:
    """The crops of ``sources`` (files or folders), in the file naming the plugin reads elsewhere:

    - a folder of ``<player_id>/`` sub-folders (the generic ``query/``/``gallery/`` layout): the
      sub-folder is the player id, ``item_id`` ``<player_id>/<stem>``;
    - a folder of crops (an MMSports ``reid_test/query/`` or ``reid_challenge/gallery/``, or any
      crops): the player id where the name is ``<player_id>_<sequence>_<frame>``, else unknown ("");
      ``item_id`` the file stem;
    - a crop file: as in a flat folder.

    ``c<k>`` in a name is the camera. DomainFMError (naming the path) for a missing path, a file
    that is not .jpg/.jpeg/.png, a folder with no crops or with both crops and player folders."""
    records: list[ReIDRecord] = []
    for source in sources:
        p = Path(source)
        if p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DomainFMError(f"is not a crop image ({', '.join(IMAGE_SUFFIXES)})", path=p,
                                    fix=f"give {what} crops or folders of {CROPS_LAYOUT}")
            records.append(_loose_record(p, p.stem))
            continue
        flag = "--gallery" if what == "gallery" else f"INPUT (the {what} crops)"
        if not p.is_dir():
            raise DomainFMError(f"{what} path not found", path=p, fix=f"give {flag} a folder of {CROPS_LAYOUT}")
        before = len(records)
        players = sorted(d for d in p.iterdir() if d.is_dir())
        loose = _images(p)
        if players and loose:
            raise DomainFMError("holds both crops and player sub-folders", path=p,
                                fix=f"move the crops into {p}/<player_id>/, or keep one kind")
        if loose:
            records += [_loose_record(f, f.stem) for f in loose]
        else:
            for d in players:
                records += [ReIDRecord(path=f, pid=d.name, item_id=f"{d.name}/{f.stem}", camera=camera_of(f))
                            for f in _images(d)]
        if len(records) == before:
            raise DomainFMError(f"no {what} crops ({', '.join(IMAGE_SUFFIXES)}) found: {_what_is_there(p)}", path=p,
                                fix=f"give {flag} a folder of {CROPS_LAYOUT}")
    if not records:
        raise DomainFMError(f"no {what} crops given", fix=f"give {what} crops or folders of crops")
    return records
