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
