"""Click path types whose refusal is one line saying what was found and what the flag takes.

Apart from :mod:`domainfm.cli` because the core settings' options (:mod:`domainfm.config`) use them
too, and ``config`` must not import the CLI (the core has no import circle)."""

from __future__ import annotations

from pathlib import Path

import click


class PathMismatch(click.BadParameter):
    """A path given to a flag that takes a folder is a file, or the other way round."""

    def __init__(self, message: str, *, path: str, fix: str | None, ctx=None, param=None):
        super().__init__(message, ctx=ctx, param=param)
        self.path, self.fix = path, fix

    def format_message(self) -> str:
        return self.message


class PathParam(click.Path):
    """A ``click.Path`` whose refusal says what is there and what the flag takes, as one line:
    ``error: a.txt: is a file, but --data takes a folder. Fix: <fix>; see <command> --help.``
    ``fix``: what the flag's folder or file should be (e.g. "a folder holding s2/<patch_id>.tif")."""

    def __init__(self, *, fix: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fix = fix

    def convert(self, value, param, ctx):
        p = Path(value)
        flag = (max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name) \
            if param is not None else "this flag"
        if not self.file_okay and p.is_file():
            raise PathMismatch(f"is a file, but {flag} takes a folder", path=str(value), fix=self.fix, ctx=ctx,
                               param=param)
        if not self.dir_okay and p.is_dir():
            raise PathMismatch(f"is a folder, but {flag} takes a file", path=str(value), fix=self.fix, ctx=ctx,
                               param=param)
        return super().convert(value, param, ctx)
