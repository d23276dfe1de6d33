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
        parts.append(message.rstrip().rstrip("."))  # a re-raised worker error ends in a newline
        text = " ".join(parts)
        if fix:
            text += f". Fix: {fix.rstrip('.')}"
        super().__init__(text + ".")
        self.path = path
        self.fix = fix


def _expect(path: str | Path, flag: str, kind: str, *, fix: str, missing: str | None) -> Path:
    """``path`` when it is a ``kind`` ("folder" or "file"), else one DomainFMError saying what is
    there instead: the other kind, or nothing (``missing``, default "<flag> <kind> not found")."""
    p = Path(path)
    is_kind, is_other = (p.is_dir(), p.is_file()) if kind == "folder" else (p.is_file(), p.is_dir())
    if is_kind:
        return p
    if is_other:
        other = "file" if kind == "folder" else "folder"
        raise DomainFMError(f"is a {other}, but {flag} takes a {kind}", path=p, fix=fix)
    raise DomainFMError(missing or f"{flag} {kind} not found", path=p, fix=fix)


def expect_folder(path: str | Path, flag: str, *, fix: str, missing: str | None = None) -> Path:
    """``path`` as a folder, or a DomainFMError that says what was found there instead: nothing
    (``missing``, default "<flag> folder not found") or a file ("is a file, but <flag> takes a
    folder"). ``fix`` says what the folder should hold."""
    return _expect(path, flag, "folder", fix=fix, missing=missing)


def expect_file(path: str | Path, flag: str, *, fix: str, missing: str | None = None) -> Path:
    """``path`` as a file, or a DomainFMError that says what was found there instead: nothing
    (``missing``, default "<flag> file not found") or a folder ("is a folder, but <flag> takes a
    file"). ``fix`` says what the file should be."""
    return _expect(path, flag, "file", fix=fix, missing=missing)
