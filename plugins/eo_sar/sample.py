"""The embedded sample: generated on first use by :func:`plugins.eo_sar.synthetic.write_sample`
into a cache folder (nothing binary is shipped in the package).

Cache location: ``$DOMAINFM_CACHE/eo_sar/sample-v<version>``, else ``$XDG_CACHE_HOME/domainfm/...``,
else ``~/.cache/domainfm/...``. The folder is built under a temporary name and renamed, so a
crash half-way never leaves a partial sample that later runs would trust.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Bump when synthetic.py changes what it writes: old caches are then ignored.
SAMPLE_VERSION = 1
SAMPLE_PATCHES = 48
SAMPLE_SEED = 0


def cache_dir() -> Path:
    if os.environ.get("DOMAINFM_CACHE"):
        return Path(os.environ["DOMAINFM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "domainfm"


def sample_root() -> Path:
    return cache_dir() / "eo_sar" / f"sample-v{SAMPLE_VERSION}"


def ensure_sample() -> Path:
    """The sample's root folder, generated (about a second) if it is not cached yet."""
    root = sample_root()
    if (root / "COMPLETE").is_file():
        return root
    from domainfm.errors import DomainFMError
    from plugins.eo_sar.synthetic import write_sample

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=root.parent))
    except OSError as e:
        raise DomainFMError(f"cannot write the embedded sample there ({e.strerror})", path=root.parent,
                            fix="set DOMAINFM_CACHE to a writable folder, or pass --data") from None
    try:
        write_sample(staging, n_patches=SAMPLE_PATCHES, seed=SAMPLE_SEED)
        (staging / "COMPLETE").write_text(f"eo-sar embedded sample v{SAMPLE_VERSION}, {SAMPLE_PATCHES} patches\n")
        if root.exists() and not (root / "COMPLETE").is_file():
            # the rename below is atomic, so a folder without the marker was not left by a
            # writer in progress but emptied or edited by hand: replace it
            shutil.rmtree(root, ignore_errors=True)
        try:
            staging.rename(root)
        except OSError:  # another process finished first: use theirs
            if not (root / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
