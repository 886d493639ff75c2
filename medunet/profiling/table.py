"""Side-by-side tables of :class:`ProfileResult` s, each figure with its ratio to a baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from medunet.profiling.profiler import MIB, ProfileResult


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


#: (attribute, column title, formatter of the raw value)
COLUMNS: list[tuple[str, str, Callable[[float], str]]] = [
    ("params", "params", _count),
    ("size_mb", "size MB", lambda v: f"{v:.2f}"),
    ("macs", "MACs", _count),
    ("peak_infer_bytes", "infer peak MiB", lambda v: f"{v / MIB:.0f}"),
    ("peak_train_bytes", "train peak MiB", lambda v: f"{v / MIB:.0f}"),
    ("skip_bytes", "skip MiB", lambda v: f"{v / MIB:.2f}"),
    ("latency_ms", "fwd ms", lambda v: f"{v:.0f}"),
    ("train_latency_ms", "fwd+bwd ms", lambda v: f"{v:.0f}"),
]


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None where either is missing or the reference is zero."""
    if value is None or not reference:
        return None
    return value / reference


def comparison_rows(results: Sequence[ProfileResult], baseline: str | None = None) -> list[dict[str, str]]:
    """One dict per result: formatted figures, each followed by ``(x ratio)`` to ``baseline``."""
    reference = next((r for r in results if r.name == baseline), None)
    rows = []
    for result in results:
        row = {"network": result.name}
        for attribute, title, fmt in COLUMNS:
            value = getattr(result, attribute)
            if value is None:
                row[title] = "-"
                continue
            cell = fmt(value)
            scale = ratio(value, getattr(reference, attribute)) if reference else None
            if scale is not None and result is not reference:
                cell += f" ({scale:.2f}x)"
            row[title] = cell
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """Rows of equal keys as an aligned markdown table."""
    if not rows:
        return ""
    titles = list(rows[0])
    widths = [max(len(t), *(len(r[t]) for r in rows)) for t in titles]
    lines = [
        "| " + " | ".join(t.ljust(w) for t, w in zip(titles, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(r[t].ljust(w) for t, w in zip(titles, widths)) + " |" for r in rows]
    return "\n".join(lines)
