"""Benchmark outputs: a CSV, a markdown table with ratios to the baseline, and Pareto plots."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medunet.bench.efficiency import EfficiencyResult
from medunet.engines.checkpoint import LOST_CLASS_DICE
from medunet.environment import cpu_model, device_description, git_commit
from medunet.profiling import comparison_rows, markdown_table
from medunet.profiling.profiler import MIB

#: Marks a Dice figure of a run that lost a class (:func:`lost_class_note` explains it under the table).
LOST_MARK = " †"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Rows of dicts as CSV; the header is the union of keys in first-seen order; a list of names becomes
    ``"a; b"`` (empty: ``""``)."""
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    names = lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value)  # noqa: E731
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows({key: "; ".join(value) if names(value) else value for key, value in row.items()}
                         for row in rows)
    return path


def efficiency_tables(results: Sequence[EfficiencyResult], baseline: str) -> str:
    """One markdown table per input shape, figures with ratios to ``baseline`` measured alongside."""
    sections = []
    shapes = list(dict.fromkeys(r.profile.input_shape for r in results))
    for shape in shapes:
        subset = [r for r in results if r.profile.input_shape == shape]
        rows = comparison_rows([r.profile for r in subset], baseline)
        reference = next((r for r in subset if r.profile.name == baseline), None)
        for row, result in zip(rows, subset):
            if result.throughput_vps is None:
                continue
            cell = f"{result.throughput_vps / 1e6:.2f}"
            if reference and reference.throughput_vps and result is not reference:
                cell += f" ({result.throughput_vps / reference.throughput_vps:.2f}x)"
            row["SW Mvox/s"] = cell
        if any("SW Mvox/s" in row for row in rows):
            for row in rows:
                row.setdefault("SW Mvox/s", "-")
        sections.append(f"Input {'x'.join(map(str, shape))}:\n\n{markdown_table(rows)}")
    return "\n\n".join(sections)


def accuracy_table(rows: Sequence[dict[str, Any]], baseline: str) -> str:
    """Dice per label for each trained network, with the difference to ``baseline``'s mean Dice."""
    reference = next((r for r in rows if r["network"] == baseline), None)
    table = []
    for row in rows:
        cells = {"network": row["network"]}
        for key, value in row.items():
            if key.startswith("dice_") or key == "mean_dice":
                cells[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
        if reference and row is not reference:
            cells["mean_dice"] += f" ({row['mean_dice'] - reference['mean_dice']:+.4f})"
        if row.get("lost_classes"):
            cells["mean_dice"] += LOST_MARK
        cells["train min"] = f"{row.get('train_seconds', 0) / 60:.1f}"
        cells["trained on"] = row.get("trained_on") or "-"
        table.append(cells)
    return markdown_table(table)


def cross_validation_table(summary: Sequence[dict[str, Any]], baseline: str) -> str:
    """Mean +- SD over folds of each network's Dice (mean and per label), the per-fold values, and the mean
    paired difference to ``baseline`` (:func:`medunet.bench.accuracy.fold_summary` rows)."""
    reference = next((entry for entry in summary if entry["network"] == baseline), None)
    table = []
    for entry in summary:
        cells = {"network": entry["network"], "folds": str(len(entry["folds"]))}
        cells["mean Dice"] = f"{entry['mean_dice']:.4f} ± {entry['mean_dice_sd']:.4f}"
        if reference is not None and entry is not reference:
            common = [k for k in entry["per_fold"] if k in reference["per_fold"]]
            if common:
                difference = sum(entry["per_fold"][k] - reference["per_fold"][k] for k in common) / len(common)
                cells["mean Dice"] += f" ({difference:+.4f})"
        for key in entry:
            if key.startswith("dice_") and not key.endswith("_sd"):
                cells[key] = f"{entry[key]:.4f} ± {entry[key + '_sd']:.4f}"
        lost = entry.get("lost", {})
        cells["per fold"] = " / ".join(f"{value:.4f}" + (LOST_MARK if fold in lost else "")
                                       for fold, value in entry["per_fold"].items())
        cells["DS heads"] = str(entry.get("deep_supervision") or 0)
        cells["train min (all folds)"] = f"{entry.get('train_seconds', 0) / 60:.1f}"
        table.append(cells)
    return markdown_table(table)


def comparison_sentences(comparisons: Sequence[dict[str, Any]], bar: str | None = None, margin: float = 0.005) -> str:
    """One sentence per compared pair (:func:`medunet.bench.accuracy.compare_networks`): the mean paired
    difference, its SD, the folds won, and whether it exceeds the fold-to-fold spread; against ``bar``, also
    whether the network beats it by ``margin`` (issue 10 asks for 0.005 over SegResNet)."""
    lines = []
    for c in comparisons:
        line = f"- `{c['network']}` vs `{c['reference']}`: {_paired_phrase(c)}."
        failed = c.get("failed_folds") or []
        if failed:
            folds = ", ".join(str(k) for k in failed)
            which = f"Fold {folds} counts" if len(failed) == 1 else f"Folds {folds} count"
            line += (f" {which} a run that lost a class ({LOST_MARK.strip()}), a failed training rather than a weaker "
                     "network; " + (f"without it: {_paired_phrase(c['healthy'])}." if c.get("healthy")
                                    else "no fold is left without one."))
        if bar is not None and c["reference"] == bar:
            judged = c.get("healthy") if failed else c  # none when every fold counts a failed run
            beats = judged is not None and judged["difference"] >= margin and judged["exceeds_spread"]
            line += (f" Beats `{bar}` by {margin} beyond the spread{' on the healthy folds' if failed else ''}: "
                     f"{'yes' if beats else 'no'}.")
        lines.append(line)
    return "\n".join(lines)


def _paired_phrase(c: dict[str, Any]) -> str:
    """A paired comparison (:func:`medunet.bench.accuracy.compare_networks`) in words."""
    verdict = ("**exceeds the fold-to-fold spread**" if c["exceeds_spread"] else
               "within the fold-to-fold spread" if c["folds"] > 1 else "one fold: no spread to compare with")
    return (f"{c['difference']:+.4f} mean Dice (paired SD {c['difference_sd']:.4f}, fold SD up to "
            f"{c['fold_sd']:.4f}, higher in {c['wins']} of {c['folds']} folds): {verdict}")


def lost_class_note(rows: Sequence[dict[str, Any]]) -> str:
    """A paragraph naming the runs whose scored validation lost a class (empty when none did).

    Args:
        rows: :func:`medunet.bench.accuracy.run_accuracy` rows.
    """
    failed = [row for row in rows if row.get("lost_classes")]
    if not failed:
        return ""
    runs = "; ".join(f"`{row['network']}`" + (f" fold {row['fold']}" if row.get("fold") is not None else "")
                     + f" ({', '.join(row['lost_classes'])}, mean Dice {row['mean_dice']:.4f})" for row in failed)
    return (f"{LOST_MARK.strip()} **A run lost a class** (validation Dice below {LOST_CLASS_DICE} at the scored "
            f"epoch): {runs}. The network predicts (almost) none of that class: a failed training, not a weaker "
            "network. Its Dice stays in the tables; across folds, the comparisons also give each pair without it. "
            "Retrain it with another seed (`--set seed=N`) to see the network's own figure.")


def rank_agreement_section(agreement: dict[str, Any], first: str, second: str) -> str:
    """The rank agreement of two protocols (:func:`medunet.bench.accuracy.rank_agreement`) as markdown."""
    flipped = ", ".join(f"`{a}`/`{b}`" for a, b in agreement["discordant"]) or "none"
    return (f"{agreement['networks']} networks trained under both; Kendall's tau {agreement['kendall_tau']:.3f}, "
            f"Spearman's rho {agreement['spearman_rho']:.3f}; pairs ordered differently: {flipped}.\n\n"
            f"- {first}: " + " > ".join(f"`{n}`" for n in agreement["order_first"]) + "\n"
            f"- {second}: " + " > ".join(f"`{n}`" for n in agreement["order_second"]))


def provenance_line() -> str:
    """Date, machine, device and commit, for the head of a results file."""
    found = git_commit()
    # A copy of the tree without .git (e.g. on a lent GPU machine) names its commit in MEDUNET_COMMIT.
    commit = found[0][:7] if found else os.environ.get("MEDUNET_COMMIT", "unknown")
    device = device_description()
    if device.startswith("CPU"):
        device = f"{device}, {cpu_model()}"
    return (
        f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.system()}, {device}, "
        f"torch {torch.__version__}, commit {commit}"
    )


def plot_shape(efficiency: Sequence[EfficiencyResult]) -> tuple[int, ...] | None:
    """The input shape the Pareto plot uses: the largest 3D input profiled (else the first shape)."""
    shapes = list(dict.fromkeys(r.profile.input_shape for r in efficiency))
    volumes = [shape for shape in shapes if len(shape) == 5]
    return max(volumes, key=lambda shape: math.prod(shape)) if volumes else (shapes[0] if shapes else None)


def pareto_plot(
    efficiency: Sequence[EfficiencyResult], accuracy: Sequence[dict[str, Any]], shape: tuple[int, ...], path: Path,
) -> Path | None:
    """Mean Dice against parameters and against peak inference memory at ``shape``; None without data."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = {row["network"]: row["mean_dice"] for row in accuracy}
    points = [r.profile for r in efficiency if r.profile.input_shape == shape and r.profile.name in dice]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (label, value) in zip(
        axes,
        [("parameters", lambda p: p.params), ("peak inference memory (MiB)", lambda p: (p.peak_infer_bytes or 0) / MIB)],
    ):
        xs = [value(p) for p in points]
        ys = [dice[p.name] for p in points]
        colours = ["tab:red" if p.name.startswith("monai_") else "tab:blue" for p in points]
        ax.scatter(xs, ys, c=colours)
        for x, y, p in zip(xs, ys, points):
            ax.annotate(p.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        # Ticks at 1, 2 and 5 per decade, labelled 200k, 1M...: readable over short and long ranges alike.
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("mean Dice (validation fold)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Accuracy against cost at {'x'.join(map(str, shape))} (red: MONAI baselines)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HOW_TO_READ = """\
How to read this: the efficiency tables give each network's cost at fixed inputs; a figure in brackets is
the ratio to the baseline measured in the same run (below 1x: cheaper); forward latencies are medians of the
networks timed in turn, round after round, so a drift of the machine's speed reaches them alike. The accuracy table gives Dice on the
validation cases of one fold after every network was trained with the same recipe and budget (the model of
the last epoch; the bracket is the difference in mean Dice to the baseline). A network is worth its place
when no other is both cheaper and at least as accurate: it lies on the upper-left edge of the plots. The
Dice figures come from one fold and one seed: small differences can be run-to-run noise, so check them on
other folds (--folds 0 1 2) before concluding."""
HOW_TO_READ_FOLDS = """\
With several folds (--folds), each network's Dice is the mean ± SD over folds (the SD is the fold-to-fold
spread: the validation cases change, the recipe and seed do not), and a sentence per network says whether its
paired difference to the MONAI UNet and to SegResNet exceeds that spread; a difference inside it is not a
finding. CPU peak-memory figures move by about ±0.15x between runs: with --repeats-memory N they are the median
of N fresh-process measurements."""


def results_report(
    command: str,
    baseline: str,
    efficiency: Sequence[EfficiencyResult],
    accuracy: Sequence[dict[str, Any]] | None = None,
    recipe: dict[str, Any] | None = None,
    setup: str = "",
    plot: str | None = None,
    folds: dict[str, Any] | None = None,
) -> str:
    """The benchmark's results file (``benchmarks/RESULTS.md``): provenance, command, recipe, tables, plot.

    Args:
        command: the exact command that produced it.
        baseline: the network ratios and Dice differences are taken against.
        efficiency: the efficiency half's results.
        accuracy: the accuracy half's rows (:func:`medunet.bench.accuracy.run_accuracy`); None without it.
        recipe: the training recipe (workflow overrides) shared by every network.
        setup: a line naming the data, fold and workflow of the accuracy half.
        plot: the Pareto plot's path relative to the results file, embedded as an image.
        folds: a cross-validation's ``{"summary", "comparisons", "bar"}`` (and ``"agreement"``, ``"protocols"``
            when compared with another protocol), shown instead of the one-fold table.
    """
    parts = [
        "# medunet bench results",
        provenance_line(),
        f"Command (from the repository root):\n\n```bash\n{command}\n```",
        HOW_TO_READ if folds is None else HOW_TO_READ_FOLDS,
        f"## Efficiency\n\nRatios are to `{baseline}`, measured in the same run.\n\n{efficiency_tables(efficiency, baseline)}",
    ]
    if accuracy is not None:
        section = ["## Accuracy", setup] if setup else ["## Accuracy"]
        if recipe is not None:
            section.append("Recipe (workflow overrides, the same for every network):\n\n```json\n"
                           f"{json.dumps(recipe, indent=2)}\n```")
        if folds is None:
            section.append(f"Dice per label on the validation fold; differences are to `{baseline}`.\n\n"
                           f"{accuracy_table(accuracy, baseline)}")
        else:
            section.append(f"Mean ± SD over folds (sample SD); the bracket is the mean paired difference to "
                           f"`{baseline}`.\n\n{cross_validation_table(folds['summary'], baseline)}")
        note = lost_class_note(accuracy)
        if note:
            section.append(note)
        if folds is not None:
            section.append("### Which differences exceed the fold-to-fold spread\n\n"
                           + (comparison_sentences(folds["comparisons"], folds.get("bar")) or "No pair to compare."))
            if folds.get("agreement") is not None:
                first, second = folds["protocols"]
                section.append("### Rank agreement between protocols\n\n"
                               + rank_agreement_section(folds["agreement"], first, second))
        if plot:
            section.append(f"![Mean Dice against parameters and peak inference memory]({plot})")
        parts.append("\n\n".join(section))
    return "\n\n".join(parts) + "\n"
