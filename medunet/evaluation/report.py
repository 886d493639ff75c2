"""Clinical-style evaluation report: one self-contained HTML file and a PDF with the same content.

Content: title, intended-use note, provenance, problems found while matching cases, the summary table per
label (mean ± std, median, IQR, 5th-95th percentile, bootstrap 95% CI, valid cases, failures), per-label
distribution plots (box and points), Bland-Altman agreement of predicted and reference volumes, and axial
slice overlays of the best, median and worst case (by foreground Dice) with reference and predicted
contours, on the image when an image folder is given.

The HTML embeds its figures as base64 PNGs and its CSS inline, and loads nothing from the network. The PDF
is written with matplotlib's ``PdfPages``. Figures are built with ``matplotlib.figure.Figure`` (no pyplot),
so no GUI backend or global state is involved.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from medunet.atomic import atomic_path, atomic_write_text
from medunet.evaluation import cases as case_io
from medunet.evaluation.aggregate import FOREGROUND
from medunet.evaluation.result import EvaluationResult

INTENDED_USE = (
    "Research use only. Not for diagnosis, treatment or any clinical decision. These numbers describe "
    "agreement between automatic segmentations and reference segmentations on the listed data; they do not "
    "establish clinical validity, and performance on other scanners, protocols or populations is unknown."
)
# (metric column, label in the table, unit) in the order of the summary table.
TABLE_METRICS = (
    ("dice", "Dice", ""),
    ("iou", "IoU", ""),
    ("sensitivity", "Sensitivity", ""),
    ("precision", "Precision", ""),
    ("hd95_mm", "HD95", "mm"),
    ("assd_mm", "ASSD", "mm"),
    ("nsd", "NSD", ""),
    ("volume_error_ml", "Volume error", "mL"),
)
DISTRIBUTION_METRICS = (("dice", "Dice"), ("nsd", "NSD"), ("hd95_mm", "HD95 (mm)"), ("assd_mm", "ASSD (mm)"))
TABLE_HEADER = ("Label", "Metric", "Mean ± SD", "Median", "IQR", "P5 – P95", "95% CI (mean)", "Valid", "Failures")
REFERENCE_COLOUR, PREDICTION_COLOUR = "#00c853", "#ff1744"
A4_PORTRAIT, A4_LANDSCAPE = (8.27, 11.69), (11.69, 8.27)
_TABLE_ROWS_PER_PAGE = 36


def write_report(
    result: EvaluationResult, out_dir: Path, images_dir: str | Path | None = None, title: str | None = None
) -> dict[str, Path]:
    """Write ``report.html`` and ``report.pdf`` into ``out_dir``; returns their paths by kind."""
    title = title or "Segmentation evaluation report"
    figures = {
        "Distribution per label": distribution_figure(result),
        "Volume agreement (Bland-Altman)": bland_altman_figure(result),
        "Best, median and worst case": overlay_figure(result, images_dir),
    }
    html_path = Path(out_dir) / "report.html"
    atomic_write_text(render_html(result, title, figures), html_path)
    pdf_path = Path(out_dir) / "report.pdf"
    render_pdf(result, title, figures, pdf_path)
    return {"report_html": html_path, "report_pdf": pdf_path}


# ---------------------------------------------------------------------------------------------- table


def summary_table(result: EvaluationResult) -> list[tuple[str, ...]]:
    """Rows of the summary table (see :data:`TABLE_HEADER`), per label then the foreground."""
    keys = [str(label) for label in result.labels] + ([FOREGROUND] if len(result.labels) > 1 else [])
    rows = []
    for key in keys:
        name = result.labels[int(key)] if key != FOREGROUND else "all foreground"
        for metric, metric_name, unit in TABLE_METRICS:
            stats = result.aggregates[key][metric]
            rows.append((
                name,
                f"{metric_name} ({unit})" if unit else _nsd_name(metric_name, result, key),
                f"{_fmt(stats['mean'])} ± {_fmt(stats['std'])}",
                _fmt(stats["median"]),
                f"{_fmt(stats['q25'])} – {_fmt(stats['q75'])}",
                f"{_fmt(stats['p05'])} – {_fmt(stats['p95'])}",
                f"{_fmt(stats['ci_low'])} – {_fmt(stats['ci_high'])}",
                f"{int(stats['n_valid'])}/{int(stats['n_cases'])}",
                str(int(stats["n_failures"])),
            ))
    return rows


def _nsd_name(metric_name: str, result: EvaluationResult, key: str) -> str:
    if metric_name != "NSD":
        return metric_name
    tolerances = result.provenance["evaluation"]["nsd_tolerance_mm"]
    if key == FOREGROUND:
        return "NSD"
    return f"NSD @ {tolerances[result.labels[int(key)]]:g} mm"


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


# -------------------------------------------------------------------------------------------- figures


def distribution_figure(result: EvaluationResult) -> Figure:
    """Box plot with the individual cases as points, per label, for Dice, NSD, HD95 and ASSD."""
    figure = Figure(figsize=A4_LANDSCAPE, layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    rng = np.random.default_rng(0)
    names = list(result.labels.values())
    for ax, (metric, metric_name) in zip(axes, DISTRIBUTION_METRICS, strict=True):
        per_label = [_finite([r[metric] for r in result.rows if r["label"] == label]) for label in result.labels]
        positions = np.arange(1, len(per_label) + 1)
        ax.boxplot(per_label, positions=positions, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for position, values in zip(positions, per_label, strict=True):
            jitter = rng.uniform(-0.15, 0.15, size=len(values))
            ax.scatter(position + jitter, values, s=9, alpha=0.6, color="#1565c0", zorder=3)
        ax.set_xticks(positions, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
        ax.set_title(metric_name)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle("Per-case metrics by label (box: median and IQR, whiskers 1.5 IQR; points: cases)")
    return figure


def bland_altman_figure(result: EvaluationResult) -> Figure:
    """Predicted minus reference volume against their mean, per label, with bias and 95% limits."""
    labels = list(result.labels.items())
    columns = min(3, len(labels))
    rows = -(-len(labels) // columns)
    figure = Figure(figsize=(A4_LANDSCAPE[0], min(A4_LANDSCAPE[1], 3.6 * rows + 0.6)), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (label, name) in zip(axes, labels, strict=False):
        label_rows = [r for r in result.rows if r["label"] == label and r["status"] != "both_empty"]
        ref = np.array([r["ref_volume_ml"] for r in label_rows], dtype=float)
        pred = np.array([r["pred_volume_ml"] for r in label_rows], dtype=float)
        _bland_altman_axes(ax, ref, pred, name)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    figure.suptitle("Volume agreement: predicted − reference vs mean volume (bias and bias ± 1.96 SD)")
    return figure


def _bland_altman_axes(ax, ref: np.ndarray, pred: np.ndarray, name: str) -> None:
    mean, difference = (ref + pred) / 2, pred - ref
    ax.scatter(mean, difference, s=12, alpha=0.7, color="#1565c0")
    if difference.size:
        bias = difference.mean()
        spread = 1.96 * difference.std(ddof=1) if difference.size > 1 else 0.0
        ax.axhline(bias, color="black", lw=1, label=f"bias {bias:+.2f} mL")
        for limit in (bias - spread, bias + spread):
            ax.axhline(limit, color="grey", lw=1, ls="--")
        ax.legend(loc="best", fontsize=8, title=f"limits {bias - spread:+.2f} / {bias + spread:+.2f} mL",
                  title_fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(f"{name} (n = {difference.size})")
    ax.set_xlabel("mean of predicted and reference volume (mL)")
    ax.set_ylabel("predicted − reference (mL)")
    ax.grid(alpha=0.3)


def pick_cases(result: EvaluationResult) -> list[tuple[str, str, float]]:
    """(role, case, foreground Dice) of the best, median and worst case; roles merge for repeated cases."""
    scored = sorted(
        ((case["dice"], case["case"]) for case in result.foreground_per_case() if np.isfinite(case["dice"])),
        key=lambda item: (item[0], item[1]),
    )
    if not scored:
        return []
    chosen = {"best": scored[-1], "median": scored[len(scored) // 2], "worst": scored[0]}
    roles: dict[str, list[str]] = {}
    for role, (_, case) in chosen.items():
        roles.setdefault(case, []).append(role)
    dice = {case: value for value, case in scored}
    return [(" = ".join(case_roles), case, dice[case]) for case, case_roles in roles.items()]


def overlay_figure(result: EvaluationResult, images_dir: str | Path | None = None) -> Figure:
    """Axial slice through the largest reference area of the best, median and worst case, with contours."""
    picked = pick_cases(result)
    figure = Figure(figsize=(A4_LANDSCAPE[0], 4.8), layout="constrained")
    axes = figure.subplots(1, max(1, len(picked)), squeeze=False).ravel()
    rows_by_case = {row["case"]: row for row in result.rows}
    for ax, (role, case, dice) in zip(axes, picked, strict=True):
        row = rows_by_case[case]
        image_file = case_io.find_image(Path(images_dir), case) if images_dir else None
        _overlay_axes(ax, Path(row["reference_file"]), row["prediction_file"] or None, image_file)
        ax.set_title(f"{role}: {case}\nforeground Dice {dice:.3f}, {ax.get_title()}", fontsize=10)
    if not picked:
        axes[0].text(0.5, 0.5, "no case with a defined Dice", ha="center", va="center")
        axes[0].axis("off")
    handles = [
        _legend_line(REFERENCE_COLOUR, "reference"),
        _legend_line(PREDICTION_COLOUR, "prediction", "--"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    figure.suptitle("Axial slice through the largest reference area" + ("" if images_dir else " (labels only)"))
    return figure


def _overlay_axes(ax, ref_file: Path, pred_file: str | None, image_file: Path | None) -> None:
    """Draw one case: image (or the reference filled) under reference and prediction contours."""
    ref, geometry = case_io.read_image(ref_file, orientation="LPS")
    pred = case_io.read_image(Path(pred_file), orientation="LPS")[0] if pred_file else np.zeros_like(ref)
    if pred.shape != ref.shape:
        pred = np.zeros_like(ref)
    index = _largest_slice(ref if ref.any() else pred)
    ref_slice, pred_slice = ref[index], pred[index]
    window = _view_window(ref_slice, pred_slice)
    aspect = geometry.spacing[1] / geometry.spacing[2]  # rows are y, columns x after LPS orientation
    if image_file is not None:
        image = case_io.read_image(image_file, orientation="LPS")[0]
        image_slice = (image[..., 0] if image.ndim == 4 else image)[index]
        low, high = np.percentile(image_slice, [1, 99])
        ax.imshow(image_slice[window], cmap="gray", vmin=low, vmax=high, aspect=aspect, interpolation="nearest")
    else:
        ax.imshow((ref_slice[window] > 0), cmap="gray", vmin=0, vmax=3, aspect=aspect, interpolation="nearest")
    for label in sorted({int(v) for v in np.unique(np.concatenate([ref_slice.ravel(), pred_slice.ravel()])) if v}):
        _contour(ax, ref_slice[window] == label, REFERENCE_COLOUR, "-")
        _contour(ax, pred_slice[window] == label, PREDICTION_COLOUR, "--")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"axial slice {index + 1} of {ref.shape[0]}")


def _largest_slice(label_map: np.ndarray) -> int:
    areas = np.count_nonzero(label_map.reshape(label_map.shape[0], -1), axis=1)
    return int(np.argmax(areas)) if areas.any() else label_map.shape[0] // 2


def _view_window(*slices: np.ndarray) -> tuple[slice, slice]:
    """The slice region around the structures, with a generous margin, so small structures are visible."""
    union = np.logical_or.reduce([s > 0 for s in slices])
    if not union.any():
        return slice(None), slice(None)
    window = []
    for axis in (0, 1):
        present = np.flatnonzero(union.any(axis=1 - axis))
        low, high = int(present[0]), int(present[-1]) + 1
        margin = max(10, (high - low) // 2)
        window.append(slice(max(0, low - margin), min(union.shape[axis], high + margin)))
    return tuple(window)


def _contour(ax, mask: np.ndarray, colour: str, style: str) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linestyles=[style], linewidths=1.4)


def _legend_line(colour: str, name: str, style: str = "-"):
    from matplotlib.lines import Line2D

    return Line2D([0], [0], color=colour, ls=style, lw=2, label=name)


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if np.isfinite(v)]


# ----------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #212121; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; border-bottom: 1px solid #bbb; }
.note { background: #fff3e0; border-left: 4px solid #ef6c00; padding: 0.6em 1em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eceff1; } tr.group td { border-top: 2px solid #607d8b; }
img { max-width: 100%; border: 1px solid #ddd; } .muted { color: #757575; font-size: 0.85em; }
"""


def render_html(result: EvaluationResult, title: str, figures: Mapping[str, Figure]) -> str:
    """The whole report as one HTML string with inline CSS and base64 PNG figures."""
    created = datetime.datetime.now().isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='muted'>Created {created} by medunet evaluate</p>",
        f"<p class='note'><strong>Intended use.</strong> {html.escape(INTENDED_USE)}</p>",
        "<h2>Provenance</h2>",
        _html_table(("Field", "Value"), _provenance_rows(result.provenance)),
        "<h2>Summary</h2>",
        _html_table(TABLE_HEADER, summary_table(result)),
        f"<p class='muted'>{html.escape(METHOD_NOTE)}</p>",
    ]
    for caption, figure in figures.items():
        parts += [f"<h2>{html.escape(caption)}</h2>", f'<img alt="{html.escape(caption)}" src="{_png_data_uri(figure)}">']
    parts += ["<h2>Problems</h2>", _html_list(result.problems or ["none: every reference had a matching prediction"])]
    parts.append("</body></html>")
    return "\n".join(parts)


METHOD_NOTE = (
    "Metrics are computed per case in the original image space with the real voxel spacing. HD95 is the "
    "larger of the two directed 95th-percentile surface distances (as MONAI); ASSD pools both directions; "
    "NSD counts surface voxels within the tolerance. Dice is undefined (left out) when a structure is absent "
    "from both reference and prediction; a missed or false-positive structure scores Dice 0 and the image "
    "diagonal as HD95 and ASSD, and counts as a failure. The 95% CI is a percentile bootstrap of the mean."
)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = []
    for i, row in enumerate(rows):
        group = " class='group'" if i and row[0] != rows[i - 1][0] else ""
        body.append(f"<tr{group}>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in items) + "</ul>"


def _png_data_uri(figure: Figure, dpi: int = 110) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _provenance_rows(provenance: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in provenance.items():
        if isinstance(value, Mapping):
            rows += _provenance_rows(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", str(value)))
    return rows


# ------------------------------------------------------------------------------------------------ pdf


def render_pdf(result: EvaluationResult, title: str, figures: Mapping[str, Figure], path: Path) -> Path:
    """The report as a PDF: a front page, the summary table, then one page per figure (written atomically)."""
    metadata = {"Title": title, "Creator": "medunet evaluate"}
    with atomic_path(path) as temporary, PdfPages(temporary, metadata=metadata) as pdf:
        pdf.savefig(_front_page(result, title))
        for page in _table_pages(result):
            pdf.savefig(page)
        for figure in figures.values():
            pdf.savefig(figure)
    return path


def _front_page(result: EvaluationResult, title: str) -> Figure:
    page = Figure(figsize=A4_PORTRAIT)
    page.text(0.07, 0.95, title, fontsize=18, weight="bold", va="top")
    created = datetime.datetime.now().isoformat(timespec="seconds")
    page.text(0.07, 0.915, f"Created {created} by medunet evaluate", fontsize=8, color="grey", va="top")
    page.text(0.07, 0.89, textwrap.fill("Intended use: " + INTENDED_USE, 95), fontsize=9, va="top",
              bbox={"facecolor": "#fff3e0", "edgecolor": "#ef6c00"})
    lines = [f"{key}: {value}" for key, value in _provenance_rows(result.provenance)]
    problems = result.problems or ["none: every reference had a matching prediction"]
    lines += ["", f"Problems ({len(result.problems)}):"] + [f"  {p}" for p in problems[:12]]
    if len(problems) > 12:
        lines.append(f"  ... and {len(problems) - 12} more (see report.html or summary.json)")
    page.text(0.07, 0.80, "Provenance", fontsize=12, weight="bold", va="top")
    page.text(0.07, 0.775, "\n".join(_shorten(line, 110) for line in lines), fontsize=7, va="top", family="monospace")
    return page


def _table_pages(result: EvaluationResult) -> list[Figure]:
    rows = summary_table(result)
    pages = []
    for start in range(0, len(rows), _TABLE_ROWS_PER_PAGE):
        page = Figure(figsize=A4_LANDSCAPE)
        page.text(0.04, 0.96, "Summary per label", fontsize=14, weight="bold", va="top")
        ax = page.add_axes((0.03, 0.12, 0.94, 0.8))
        ax.axis("off")
        chunk = rows[start:start + _TABLE_ROWS_PER_PAGE]
        table = ax.table(cellText=chunk, colLabels=TABLE_HEADER, loc="upper center", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7.5)
        table.auto_set_column_width(list(range(len(TABLE_HEADER))))
        page.text(0.04, 0.04, textwrap.fill(METHOD_NOTE, 170), fontsize=7, va="bottom")
        pages.append(page)
    return pages


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
