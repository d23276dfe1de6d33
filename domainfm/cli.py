"""``domainfm`` command line.

Every command answers ``--help`` without importing torch, lightning or mlflow: heavy imports live
inside the functions that run the work. Expected mistakes are :class:`DomainFMError` and print as
one line on stderr with exit status 2.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from domainfm import __version__
from domainfm.errors import DomainFMError
from domainfm.path_params import PathMismatch, PathParam  # noqa: F401 - plugins' commands use them


def _peek_plugin(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--plugin" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--plugin="):
            return a.split("=", 1)[1]
    return None


class PluginCommand(click.Command):
    """A core command (pretrain/finetune/evaluate) that grows the chosen plugin's own flags.

    The plugin named by ``--plugin`` is looked up before parsing, so its options are parsed,
    validated and shown by ``--help`` like the core ones. A ``plugin:`` key in ``--config`` is not
    enough for plugin flags on the command line; give ``--plugin`` there too.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # start from the core flags each time: one process may run several commands (tests,
        # notebooks) and a plugin's flags or defaults must not leak into the next
        if not hasattr(self, "_core_params"):
            self._core_params = list(self.params)
        self.params = list(self._core_params)
        name = _peek_plugin(args)
        ctx.meta["plugin_name"] = name
        if name:
            from domainfm import plugins

            try:
                plugin = plugins.load(name)
            except DomainFMError as e:
                fail(e)
            ctx.meta["plugin"] = plugin
            # --help shows the plugin's own defaults (copies: the core's options are shared)
            overrides = plugin.defaults(self.name)
            params = []
            for p in self.params:
                if p.name in overrides:
                    p = copy.copy(p)
                    p.default = overrides[p.name]
                params.append(p)
            existing = {p.name for p in params}
            self.params = params + [o for o in plugin.options(self.name) if o.name not in existing]
        return super().parse_args(ctx, args)


def fail(e: BaseException) -> NoReturn:
    """Print ``error: <e>`` as one line on stderr and exit with status 2: how every command, the
    plugins' and pipelines' own included, ends on an expected mistake (a DomainFMError)."""
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def renamed_flags(command: click.Command, renames: dict[str, str | None]) -> click.Command:
    """Keep old flag spellings of ``command`` working as hidden aliases: ``renames`` maps an old
    flag (``--max-tiles-per-slide``) to its new one (``--max-tiles``), or to None when the value
    became positional (``--slides A B`` -> ``A B``). Using an old spelling prints one notice line on
    stderr; ``--help`` shows only the new ones. Returns ``command``."""
    parse = command.parse_args

    def parse_args(ctx: click.Context, args: list[str]) -> list[str]:
        fixed: list[str] = []
        taking_values = False
        for a in args:
            flag, eq, value = a.partition("=")
            if a.startswith("--") and flag in renames:
                new = renames[flag]
                click.echo(f"note: {flag} is now {new or 'positional'}; the old spelling still works "
                           "for now", err=True)
                taking_values = new is None
                if new is not None:
                    fixed.append(f"{new}={value}" if eq else new)
                elif eq:
                    fixed.append(value)
                continue
            if taking_values and a.startswith("-"):
                taking_values = False
            fixed.append(a)
        return parse(ctx, fixed)

    command.parse_args = parse_args
    command.renamed_flags = dict(renames)
    return command


def _resolve_config(ctx: click.Context, command: str, params: dict[str, Any]):
    from domainfm import config as config_mod
    from domainfm import plugins

    plugin = ctx.meta.get("plugin")
    explicit = {k for k in params if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    if plugin is None:
        # the plugin may come from the YAML file
        cfg_file = params.get("config")
        name = config_mod.read_yaml(cfg_file).get("plugin") if cfg_file else None
        if not name:
            raise DomainFMError(f"{command} needs --plugin NAME",
                                fix="see `domainfm plugins` for the installed ones")
        plugin = plugins.load(name)
        params = {**params, "plugin": name}
    known = set(params) | {o.name for o in plugin.options(command)}
    cfg = config_mod.resolve(command, params, explicit, plugin_defaults=plugin.defaults(command), known=known)
    # plugin options that only the YAML could set still need their declared defaults
    for o in plugin.options(command):
        cfg.options.setdefault(o.name, o.default)
    return cfg, plugin


def write_json(path: str | None, metrics: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    tmp.replace(p)


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    rows = []
    for k, v in metrics.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v[:5])
        rows.append((str(k), str(v)))
        table.add_row(*rows[-1])
    # wide enough for whole values: paths (backbone_path, for --model) and run ids are copied from here
    need = max((len(k) for k, _ in rows), default=6) + max((len(v) for _, v in rows), default=5) + 7
    Console(stderr=True, width=max(Console(stderr=True).width, need)).print(table)


def _run(ctx: click.Context, command: str, params: dict[str, Any]) -> None:
    try:
        cfg, plugin = _resolve_config(ctx, command, params)
        supported = getattr(plugin, "supported", None)
        if supported is not None and command not in supported:  # before a run is opened or any data read
            raise DomainFMError(f"plugin {cfg.plugin!r} does not support {command}",
                                fix=f"it supports {', '.join(supported) or 'none of the core commands'} "
                                    "(see `domainfm plugins`)")
        # checked before any MLflow run exists, so a mistyped command leaves no empty run
        if command == "evaluate" and not cfg.model:
            raise DomainFMError("evaluate needs --model", fix="pass a weights file or models:/NAME@ALIAS")
        if command in ("pretrain", "finetune"):  # an unknown --backbone or a bad --img-size: before any data
            from domainfm.backbones import check_run_backbone

            check_run_backbone(cfg)
        plugin.check(cfg)
        if str(cfg.model or "").startswith("models:/"):  # a registry name that is not there: no run opened
            from domainfm import tracking

            tracking.check_registered(cfg.model)
        from domainfm import jobs

        if command == "pretrain":
            metrics = jobs.run_pretraining(cfg, plugin)
        else:
            metrics = jobs.run_plugin_job(cfg, plugin, getattr(plugin, command))
        if metrics is None:  # a non-zero rank of a multi-process run reports nothing
            return
        write_json(cfg.json, metrics)
        shown, warning = metrics, None
        if command == "pretrain":  # each loss from start to end; one line when the total did not move
            from domainfm import tracking
            from domainfm.output import LOSS_PREFIX, pretrain_summary

            curves = tuple(k for k in metrics if k.startswith((LOSS_PREFIX, "monitor/")))
            shown, warning = pretrain_summary(metrics, tracking.metric_spans(metrics["mlflow_run_id"], curves))
        print_metrics(f"{command} --plugin {cfg.plugin}", shown)
        if warning:
            click.echo(f"warning: {warning}", err=True)
    except DomainFMError as e:
        fail(e)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def usage_error_line(e: click.ClickException, ctx: click.Context | None = None) -> str:
    """Click's own mistake (missing argument, unknown option, bad choice, bad number...) as the
    project's one line: ``error: <command>: <what>. Fix: <suggestion>; see <command> --help.``.
    Click's suggestions (``Did you mean --out?``, ``Possible options: ...``) become the fix."""
    ctx = getattr(e, "ctx", None) or _deepest_context(e) or ctx
    where = ctx.command_path if ctx is not None else None
    possible = getattr(e, "possibilities", None)
    if isinstance(e, getattr(click.exceptions, "NoSuchCommand", ())) and not possible and ctx is not None:
        import difflib  # commands found through entry points (plugins, pipelines) too

        possible = difflib.get_close_matches(e.command_name, ctx.command.list_commands(ctx))
    if isinstance(e, (click.exceptions.NoSuchOption, getattr(click.exceptions, "NoSuchCommand", ()))):
        message = e.message  # without click's suggestion sentence: it goes into the fix
    else:
        message = e.format_message()
    message = " ".join(message.split())  # one line, whatever the message held
    message = message.replace("No such option: ", "No such option ").rstrip(".")
    if not isinstance(e, PathMismatch):
        message = message[:1].lower() + message[1:]
    see = f"see {where} --help" if where else None
    if isinstance(e, PathMismatch):  # the file is what the line names; the command goes into the fix
        fix = "; ".join(x for x in (e.fix, see) if x)
        return f"error: {DomainFMError(message, path=e.path, fix=fix or None)}"
    if possible:
        names = list(possible)  # closest first
        names = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        fix = f"did you mean {names}?" + (f" S{see[1:]}" if see else "")
    else:
        fix = see
    return f"error: {DomainFMError(message, path=where, fix=fix)}"


def _deepest_context(e: BaseException) -> click.Context | None:
    """The context of the innermost command the error went through: click's parser raises some
    usage errors (``--model`` without its value) with no context attached."""
    found, tb = None, e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals.get("ctx")
        if isinstance(local, click.Context):
            found = local
        tb = tb.tb_next
    return found


def _one_line(e: click.ClickException, ctx: click.Context) -> click.ClickException:
    """``e`` with a ``show`` that prints :func:`usage_error_line` (exit status unchanged: 2 for a
    usage error). Click's ``--help``-when-no-arguments stays as it is."""
    if not isinstance(e, click.exceptions.NoArgsIsHelpError):
        line = usage_error_line(e, ctx)
        e.show = lambda file=None: click.echo(line, err=True)
    return e


class DomainFMGroup(click.Group):
    """Top-level group: core commands, plus one sub-group per plugin with extra commands and the
    pipelines of the ``domainfm.pipelines`` entry-point group under ``domainfm pipeline``.

    Click's usage errors, from this group and every command under it (plugin commands and
    pipelines included), print as one ``error: ...`` line (:func:`usage_error_line`), exit 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:
            raise _one_line(e, click.Context(self, info_name=info_name, parent=parent)) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            raise _one_line(e, ctx) from None

    def list_commands(self, ctx):
        from domainfm import plugins

        names = list(super().list_commands(ctx))
        for name in plugins.names():
            try:
                if plugins.load(name).commands():
                    names.append(name)
            except Exception:  # a broken plugin must not break --help; `domainfm plugins` shows why
                pass
        return names

    def get_command(self, ctx, cmd_name):
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        from domainfm import plugins

        if cmd_name in plugins.names():
            try:
                plugin = plugins.load(cmd_name)
            except DomainFMError as e:
                fail(e)
            extra = plugin.commands()
            if extra:
                group = click.Group(cmd_name, help=f"{plugin.description}")
                for c in extra:
                    group.add_command(c)
                return group
        return None


@click.group(cls=DomainFMGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="domainfm")
def main() -> None:
    """Domain foundation models: continue the pretraining of DINOv2/CLIP backbones on your domain's
    data, fine-tune and evaluate them, with every run tracked in MLflow.

    \b
    Start here:
      domainfm plugins                        the installed domains
      domainfm pretrain --plugin eo-sar       continual pretraining on the embedded Sentinel-2 sample,
                                              from DINOv2 (needs the Hugging Face hub or its cache;
                                              offline: add --init random)
      domainfm pretrain --plugin eo-sar --help    every flag, the plugin's own included

    Runs go to $MLFLOW_TRACKING_URI, else to sqlite:///mlruns/mlflow.db in the current folder, their
    files to mlruns/artifacts beside it. Open them in the MLflow UI with:

    \b
      mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --default-artifact-root mlruns/artifacts

    (with MLFLOW_TRACKING_URI=sqlite:///PATH/mlflow.db: --backend-store-uri sqlite:///PATH/mlflow.db
    --default-artifact-root PATH/artifacts).
    """
    from domainfm.output import quiet_third_parties

    quiet_third_parties()


def _core_command(command: str, help_text: str):
    from domainfm.config import click_options

    def callback(**params):
        _run(click.get_current_context(), command, params)

    from domainfm.config import renamed_core_flags

    cmd = PluginCommand(command, callback=callback, params=click_options(command), help=help_text,
                        context_settings={"max_content_width": 110})
    renamed = renamed_core_flags(command)
    if renamed:  # old spellings (--output-dir) still parse, with a one-line notice
        renamed_flags(cmd, renamed)
    main.add_command(cmd)
    return cmd


_core_command("pretrain", """Continue the pretraining of a backbone on a plugin's data (SoftCon: soft
multi-label contrastive learning with Siamese masking and an EMA teacher). Logs to MLflow, saves
checkpoints, exports the backbone as safetensors and optionally registers it.

Add --plugin NAME --help to see that plugin's own flags.""")
_core_command("finetune", """Fine-tune a backbone on a plugin's downstream task.

Add --plugin NAME --help to see that plugin's own flags.""")
_core_command("evaluate", """Evaluate a backbone (a weights file or models:/NAME@ALIAS) with a plugin's evaluator.

Add --plugin NAME --help to see that plugin's own flags.""")


@main.command("plugins")
def plugins_cmd() -> None:
    """List the installed plugins: name, description, the core commands each supports (``domainfm
    pretrain|finetune|evaluate|predict --plugin NAME``), its own commands (``domainfm NAME CMD``)
    and the package providing it."""
    from rich.console import Console
    from rich.table import Table

    from domainfm import plugins

    table = Table(title="domainfm plugins (entry-point group domainfm.plugins)")
    for col in ("name", "description", "core commands supported", "own commands", "package"):
        table.add_column(col)
    for info in plugins.available():
        desc = info.description if info.error is None else f"[red]{info.error}[/red]"
        table.add_row(info.name, desc, ", ".join(info.core_commands), ", ".join(info.own_commands), info.package)
    Console(width=max(120, Console().width)).print(table)


class PipelineGroup(click.Group):
    def list_commands(self, ctx):
        from domainfm import plugins

        return sorted(plugins.pipelines())

    def get_command(self, ctx, cmd_name):
        from domainfm import plugins

        ep = plugins.pipelines().get(cmd_name)
        if ep is None:
            return None
        try:
            return ep.load()
        except Exception as e:
            fail(DomainFMError(f"pipeline {cmd_name!r} failed to import: {e}"))


@main.group("pipeline", cls=PipelineGroup)
def pipeline_group() -> None:
    """End-to-end jobs built from plugin steps (entry-point group domainfm.pipelines)."""


@main.group("registry")
def registry_group() -> None:
    """The MLflow model registry: list versions, show one's lineage, promote a version to an alias."""


@registry_group.command("list")
@click.option("--name", default=None, help="Only this registered model.  [default: every registered model]")
def registry_list(name: str | None) -> None:
    """Registered models, one row per version: aliases, training run, the data it saw (root and a
    short fingerprint) and the latest evaluation's metrics."""
    from rich.console import Console
    from rich.table import Table

    from domainfm import registry, tracking

    try:
        rows = registry.list_rows(name)
    except DomainFMError as e:
        fail(e)
    cols = ("name", "version", "aliases", "plugin", "training run", "data", "latest metrics", "created")
    cells = [(r["name"], str(r["version"]), ", ".join(r["aliases"]), r["plugin"], r["training_run"], r["data"],
              r["metrics"], r["created"]) for r in rows]
    table = Table(title=f"MLflow registry at {tracking.tracking_uri()}")
    for col in cols:
        table.add_column(col, no_wrap=True)
    for c in cells:
        table.add_row(*c)
    # wide enough for whole run ids and paths (copied from here into other commands)
    need = sum(max([len(h)] + [len(c[i]) for c in cells]) + 3 for i, h in enumerate(cols)) + 1
    Console(width=max(120, Console().width, need)).print(table)


@registry_group.command("show")
@click.argument("ref", metavar="NAME[@ALIAS|/VERSION]")
def registry_show(ref: str) -> None:
    """The lineage of one version: aliases, the training run (params, start weights, plugin,
    backbone), the data it saw, and every evaluation and prediction run that names it."""
    from domainfm import registry

    try:
        lines = registry.show(ref)
    except DomainFMError as e:
        fail(e)
    for line in lines:
        click.echo(line)


@registry_group.command("promote")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--alias", required=True, help="Alias to point at VERSION (e.g. champion).")
def registry_promote(name: str, version: int, alias: str) -> None:
    """Point ALIAS of registered model NAME at VERSION (models:/NAME@ALIAS then loads it)."""
    from domainfm import tracking

    try:
        tracking.set_alias(name, version, alias)
    except DomainFMError as e:
        fail(e)
    click.echo(f"models:/{name}@{alias} -> version {version}")


@main.command("export", context_settings={"max_content_width": 110})
@click.option("--model", required=True, help="A domainfm export (.safetensors) or models:/NAME@ALIAS.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), required=True,
              help="onnx (needs the [export] extra: onnx, onnxruntime) or torchscript.")
@click.option("--out", required=True, type=PathParam(dir_okay=False, fix="give a file name, e.g. model.onnx"),
              help="The file to write.")
@click.option("--with-normalization", is_flag=True,
              help="Put the per-band (x - mean) / std inside the graph: the file then takes raw values.")
def export_cmd(model: str, fmt: str, out: str, with_normalization: bool) -> None:
    """Export a backbone for serving: input image [B, C, H, W] (B dynamic), output features [B, D].

    Bands, statistics and architecture go into the file's metadata; the export is checked against
    PyTorch on batches of 1 and 7 (to 1e-4); a models:/ model gets it logged to its MLflow run."""
    from domainfm.backbones.export import export_backbone

    try:
        res = export_backbone(model, fmt, out, with_normalization=with_normalization)
    except DomainFMError as e:
        fail(e)
    errs = ", ".join(f"batch {n}: {e:.1e}" for n, e in res.max_abs_error.items())
    logged = f"; logged to MLflow run {res.mlflow_run_id}" if res.mlflow_run_id else ""
    click.echo(f"{res.path} ({fmt}; max |export - torch| {errs}){logged}")


def _peek(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class PredictCommand(click.Command):
    """``domainfm predict``: grows the flags of the plugin that made ``--model`` (or ``--plugin``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not hasattr(self, "_core_params"):
            self._core_params = list(self.params)
        self.params = list(self._core_params)
        name, model = _peek(args, "--plugin"), _peek(args, "--model")
        if name or model:
            from domainfm import plugins
            from domainfm.predict import resolve_model

            try:
                ref = resolve_model(model, name) if model else None
                plugin = plugins.load(ref.plugin if ref is not None else name)
            except DomainFMError as e:
                fail(e)
            ctx.meta["model_ref"], ctx.meta["plugin"] = ref, plugin
            existing = {p.name for p in self.params}
            self.params = self.params + [o for o in plugin.options("predict") if o.name not in existing]
        return super().parse_args(ctx, args)


@main.command("predict", cls=PredictCommand, context_settings={"max_content_width": 110})
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--model", required=True,
              help="The trained model to apply: models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow model folder "
                   "or a domainfm export. Its plugin and settings come from the model itself.")
@click.option("--out", required=True, type=PathParam(file_okay=False, fix="give a new or existing folder for the results"),
              help="Folder for the results.")
@click.option("--plugin", default=None, help="The plugin that applies the model (default: the one that made it).")
@click.option("--experiment", default="domainfm-predict", show_default=True, help="MLflow experiment of the run.")
@click.option("--run-name", default=None, help="MLflow run name (default: predict-PLUGIN-MODEL).")
@click.option("--json", "json_path", default=None, type=PathParam(dir_okay=False, fix="give a file name, e.g. summary.json"),
              help="Also write the summary to this JSON file.")
def predict_cmd(inputs: tuple[str, ...], model: str, out: str, plugin: str | None, experiment: str,
                run_name: str | None, json_path: str | None, **options) -> None:
    """Apply a trained model to new raw inputs (whole slides, EO patches, re-id crops...) with the
    settings the model records: nothing it already knows is asked again.

    \b
    Examples:
      domainfm predict --model models:/slide-msi@champion slides/*.svs --out preds/
      domainfm predict --model models:/eo-sar-demo@candidate patches/*.tif --out preds/
      domainfm predict --model models:/reid@champion query/ --gallery gallery/ --out preds/

    Add --model URI --help to see the flags of the plugin that made the model."""
    ctx = click.get_current_context()
    try:
        from domainfm import jobs

        ref = ctx.meta.get("model_ref")
        summary = jobs.run_prediction(ref, list(inputs), out, ctx.meta["plugin"], options,
                                      experiment=experiment, run_name=run_name)
        write_json(json_path, summary)
        print_metrics(f"predict --model {model}", {k: v for k, v in summary.items() if k != "files"})
        for f in summary.get("files", []):
            click.echo(str(f))
    except DomainFMError as e:
        fail(e)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)



renamed_flags(predict_cmd, {"--output-dir": "--out"})  # the training commands' old spelling, here too

def run_cli_command(fn, *args, **kwargs):
    """Run ``fn`` and turn a DomainFMError into the one-line error and exit 2 (for plugin commands)."""
    try:
        return fn(*args, **kwargs)
    except DomainFMError as e:
        fail(e)


if __name__ == "__main__":  # pragma: no cover
    main()
