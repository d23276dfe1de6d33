"""The three-arm comparison as numbers a reader can check: its rows, the winner chosen on
validation, a Markdown table (MLflow ``tables/compare.md``), a rich table on stderr and a
side-by-side figure (``plots/compare.png``)."""

from __future__ import annotations

from typing import Any

from plugins.sgd_ft.arms import Arm

TABLE_COLUMNS = ("arm", "optimizer", "freeze_embed", "lr", "metric", "value", "trainable_params", "frozen_params",
                 "optimizer_state_bytes", "peak_memory_bytes")


def _human_bytes(n: Any) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def compare_rows(results: list[tuple[Arm, dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    return [{"arm": arm.name, "optimizer": arm.optimizer, "freeze_embed": arm.freeze_embed, "lr": m["lr"],
             "metric": metric, "value": m[metric], "trainable_params": m["trainable_params"],
             "frozen_params": m["frozen_params"], "optimizer_state_bytes": m["optimizer_state_bytes"],
             "peak_memory_bytes": m["peak_memory_bytes"]} for arm, m in results]


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    head = "| arm | lr | {} | trainable params | frozen params | optimizer state | peak memory |".format(
        rows[0]["metric"])
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['value']:.4f} | {r['trainable_params']:,} | "
                     f"{r['frozen_params']:,} | {_human_bytes(r['optimizer_state_bytes'])} | "
                     f"{_human_bytes(r['peak_memory_bytes'])} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], *, winner: str | None = None, selected_by: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    caption = f"winner on {selected_by}: {winner} (its numbers and weights are the result)" if winner else None
    table = Table(title="sgd-ft: three arms on the same budget", caption=caption)
    for col in ("arm", "lr", rows[0]["metric"], "trainable params", "frozen params", "optimizer state", "peak memory"):
        table.add_column(col, justify="left" if col == "arm" else "right", no_wrap=col == "arm")
    for r in rows:
        name = r["arm"] + (" (winner)" if r["arm"] == winner else "")
        table.add_row(name, f"{r['lr']:g}", f"{r['value']:.4f}", f"{r['trainable_params']:,}",
                      f"{r['frozen_params']:,}", _human_bytes(r["optimizer_state_bytes"]),
                      _human_bytes(r["peak_memory_bytes"]))
    Console(stderr=True).print(table)


def compare_figure(rows: list[dict[str, Any]]):
    """Score, optimizer state and peak step memory of each arm, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    names = [r["arm"] for r in rows]
    colours = ["tab:green", "tab:blue", "tab:orange"][:len(rows)]
    panels = ((rows[0]["metric"], [r["value"] for r in rows], 1.0),
              ("optimizer state (MiB)", [r["optimizer_state_bytes"] for r in rows], 2 ** 20),
              ("peak step memory (MiB)", [r["peak_memory_bytes"] for r in rows], 2 ** 20))
    for ax, (title, values, scale) in zip(axes, panels):
        if any(v is None for v in values):
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.bar(names, [v / scale for v in values], color=colours)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig


def summarise_compare(results: list[tuple[Arm, dict[str, Any]]], metric: str) -> tuple[dict[str, Any], Arm]:
    """The result of a comparison: the arm that won on validation (``val_<metric>``; the test
    split only reports, it never chooses; a tie goes to the arm listed first), its numbers as the
    top-level keys with ``arm`` naming it, and every arm's numbers as ``<arm>/<key>``. The weights
    saved are the winner's, so every top-level number describes the same model."""
    val_key = f"val_{metric}"
    winner, best = results[0]
    for arm, m in results[1:]:
        if m.get(val_key) is not None and (best.get(val_key) is None or m[val_key] > best[val_key]):
            winner, best = arm, m
    out = dict(best)
    out["arm"] = winner.name
    out["winner_selected_by"] = val_key
    for arm, m in results:
        for k in (metric, val_key, "lr", "trainable_params", "frozen_params", "optimizer_state_bytes",
                  "peak_memory_bytes"):
            if m.get(k) is not None:
                out[f"{arm.name}/{k}"] = m[k]
    return out, winner


