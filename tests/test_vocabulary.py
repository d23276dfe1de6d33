"""One flag vocabulary across the whole CLI (issue 13 item 6), checked on EVERY command's --help:
the core commands, every plugin group's commands, the pipelines, pretrain/finetune/evaluate with
each installed plugin's own flags (``--plugin NAME``) and predict with each plugin's predict flags.

- ``--model`` is a trained model to apply or evaluate (a file, an MLflow model folder or models:/);
  a flag that is not one (a head type, a choice) is not called ``--model``;
- ``--weights`` is only the starting weights of a training command;
- ``--max-epochs`` (never ``--epochs``), ``--max-tiles`` (never ``--max-tiles-per-slide``),
  ``--out`` (never ``--output-dir`` / ``--out-dir``), slides positional (never ``--slides``);
- every old spelling a command keeps through ``domainfm.cli.renamed_flags`` still parses, lands on
  the new parameter and prints one notice line.
"""

from __future__ import annotations

import re

import click
import pytest

from domainfm import plugins
from domainfm.cli import main

FORBIDDEN = ("--epochs", "--max-tiles-per-slide", "--output-dir", "--out-dir", "--slides")
#: Commands that train, starting from --weights: the core's, and the pipeline that trains a slide
#: model on an encoder's features.
TRAINING = {"pretrain", "finetune", "pipeline slide-biomarker"}
#: What the help of a --model flag says about the trained model it takes.
MODEL_WORDS = ("models:/", "mlflow", ".safetensors", "export", "weights file", "trained")


def _commands():
    """``(path, command, args)`` for every leaf command: args make the command grow a plugin's flags."""
    out = []

    def walk(cmd, path, parent):
        ctx = click.Context(cmd, info_name=path[-1] if path else "domainfm", parent=parent)
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, f"{' '.join(path + [name])} is listed but cannot be loaded"
                walk(sub, path + [name], ctx)
            return
        label = " ".join(path)
        out.append((label, cmd, []))
        if label in ("pretrain", "finetune", "evaluate", "predict"):
            for name in plugins.names():
                out.append((f"{label} --plugin {name}", cmd, ["--plugin", name]))

    walk(main, [], None)
    return out


COMMANDS = _commands()


def _help_and_options(cmd: click.Command, args: list[str]) -> tuple[str, list[click.Option]]:
    """The --help text and the visible options of ``cmd`` given ``args`` (a plugin's flags added)."""
    ctx = cmd.make_context(cmd.name, list(args), resilient_parsing=True)
    with ctx:
        text = cmd.get_help(ctx)
        opts = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
    return text, opts


def _flags(opts) -> set[str]:
    return {o for p in opts for o in (*p.opts, *p.secondary_opts)}


def test_the_walk_reaches_every_kind_of_command():
    labels = {label for label, _, _ in COMMANDS}
    assert {"pretrain", "finetune", "evaluate", "predict", "export", "registry list", "registry show"} <= labels
    assert {f"pretrain --plugin {n}" for n in plugins.names()} <= labels
    assert {f"predict --plugin {n}" for n in plugins.names()} <= labels
    assert any(label.startswith("pipeline ") for label in labels)
    groups = [n for n in plugins.names() if plugins.load(n).commands()]
    assert groups and all(any(label.startswith(f"{g} ") for label in labels) for g in groups)


@pytest.mark.parametrize("label, cmd, args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_follows_the_vocabulary(label, cmd, args):
    text, opts = _help_and_options(cmd, args)
    flags = _flags(opts)
    problems = []
    for old in FORBIDDEN:
        if old in flags or re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", text):
            problems.append(f"shows {old}")
    base = label.split(" --plugin ")[0]
    if "--weights" in flags and base not in TRAINING:
        problems.append("has --weights but trains nothing (a model to apply is --model)")
    for p in opts:
        if "--model" in p.opts:
            helptext = (p.help or "").lower()
            if isinstance(p.type, click.Choice) or p.is_flag:
                problems.append(f"--model is a choice/flag ({p.type}), not a trained model")
            elif not any(w in helptext for w in MODEL_WORDS):
                problems.append(f"--model's help does not name a trained model: {p.help!r}")
    assert not problems, f"domainfm {label}: " + "; ".join(problems)


def _value_for(param: click.Parameter) -> str:
    t = param.type
    if isinstance(t, click.Choice):
        return str(t.choices[0])
    if isinstance(t, click.types.IntParamType):
        return "3"
    if isinstance(t, click.types.FloatParamType):
        return "0.5"
    return "x.svs"


RENAMED = [(label, cmd, old, new) for label, cmd, args in COMMANDS if not args
           for old, new in sorted(getattr(cmd, "renamed_flags", {}).items())]


def test_core_renames_are_listed():
    assert ("pretrain", "--output-dir", "--out") in {(lbl, o, n) for lbl, _, o, n in RENAMED}
    assert ("finetune", "--output-dir", "--out") in {(lbl, o, n) for lbl, _, o, n in RENAMED}


@pytest.mark.parametrize("label, cmd, old, new", RENAMED, ids=[f"{r[0]} {r[2]}" for r in RENAMED])
def test_old_spellings_still_parse_with_one_notice(label, cmd, old, new, capsys):
    params = cmd.get_params(click.Context(cmd))
    if new is None:  # the values became positional
        target = next(p for p in params if isinstance(p, click.Argument) and p.nargs == -1)
        args, expected = [old, "a.svs", "b.svs"], ("a.svs", "b.svs")
    else:
        target = next(p for p in params if isinstance(p, click.Option) and new in p.opts)
        value = _value_for(target)
        args = [old] if target.is_flag else [old, value]
        expected = target.type.convert(value, None, None) if not target.is_flag else True
    with cmd.make_context(cmd.name, args, resilient_parsing=True) as ctx:
        got = ctx.params[target.name]
    if isinstance(expected, tuple):
        got = tuple(got)
    assert got == expected, f"{label} {old} -> {target.name}={got!r}"
    assert capsys.readouterr().err.splitlines() == [
        f"note: {old} is now {new or 'positional'}; the old spelling still works for now"]
    # --help offers only the new spelling (its prose may still name --model of another command)
    _, opts = _help_and_options(cmd, [])
    assert old not in _flags(opts)
