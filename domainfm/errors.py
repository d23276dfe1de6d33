"""The one error type for expected mistakes.

Anything a user can cause (a missing folder, a bad GeoTIFF, an unknown plugin, no network) is
raised as :class:`DomainFMError` with a message that names the file and the fix. The CLI prints
it as one line and exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class DomainFMError(Exception):
    """An expected mistake, reported to the user as one line."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts)
        if fix:
            text += f". Fix: {fix.rstrip('.')}"
        super().__init__(text + ".")
        self.path = path
        self.fix = fix


def expect_folder(path: str | Path, flag: str, *, fix: str, missing: str | None = None) -> Path:
    """``path`` as a folder, or a DomainFMError that says what was found there instead: nothing
    (``missing``, default "<flag> folder not found") or a file ("is a file, but <flag> takes a
    folder"). ``fix`` says what the folder should hold."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise DomainFMError(f"is a file, but {flag} takes a folder", path=p, fix=fix)
    raise DomainFMError(missing or f"{flag} folder not found", path=p, fix=fix)


def expect_file(path: str | Path, flag: str, *, fix: str, missing: str | None = None) -> Path:
    """``path`` as a file, or a DomainFMError that says what was found there instead: nothing
    (``missing``, default "<flag> file not found") or a folder ("is a folder, but <flag> takes a
    file"). ``fix`` says what the file should be."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise DomainFMError(f"is a folder, but {flag} takes a file", path=p, fix=fix)
    raise DomainFMError(missing or f"{flag} file not found", path=p, fix=fix)
