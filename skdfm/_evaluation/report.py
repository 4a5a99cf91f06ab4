"""``skdfm evaluate --report``: one self-contained HTML page a person reads.

The page holds everything inline (pictures as PNG data URIs, no script, no link to
fetch): the metrics table, overall and per defect type; the image ROC and
precision-recall curves; the histogram of good and defective scores with the
threshold; and the worst mistakes at that threshold, each image over its anomaly
map on the model's colour scale. Plots need matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from .._core.files import atomic_write

__all__ = ["write_report"]

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.plots img { width: 32%; min-width: 300px; }
.cases { display: flex; flex-wrap: wrap; gap: 1em; }
.case { width: 260px; font-size: 0.85em; word-break: break-all; }
.case img { width: 256px; }
.note { color: #555; font-size: 0.9em; }
"""

_COLUMNS = [
    ("images", "images", "{:d}"),
    ("defective", "defective", "{:d}"),
    ("image_auroc", "image AUROC", "{:.4f}"),
    ("image_aupr", "image AUPR", "{:.4f}"),
    ("precision", "precision", "{:.4f}"),
    ("recall", "recall", "{:.4f}"),
    ("f1", "F1", "{:.4f}"),
    ("pixel_auroc", "pixel AUROC", "{:.4f}"),
    ("pixel_aupr", "pixel AUPR", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
]


def _png(figure_or_array) -> str:
    """A data URI of a matplotlib figure (closed) or an RGB uint8 array."""
    buffer = io.BytesIO()
    if isinstance(figure_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(figure_or_array).save(buffer, format="PNG")
    else:
        import matplotlib.pyplot as plt

        figure_or_array.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
        plt.close(figure_or_array)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _table(metrics: dict) -> str:
    rows = [("all", metrics["overall"])] + list(metrics["per_defect"].items())
    head = "".join(f"<th>{html.escape(name)}</th>" for _, name, _ in _COLUMNS)
    body = []
    for label, values in rows:
        cells = "".join(
            f"<td>{fmt.format(values[key]) if key in values else 'n/a'}</td>"
            for key, _, fmt in _COLUMNS
        )
        body.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return (
        f"<table><tr><th>defect type</th>{head}</tr>{''.join(body)}</table>"
        "<p class='note'>Each defect type is measured against all the good images. "
        "Precision, recall and F1 are at the model's threshold; pixel metrics "
        "cover the images with ground-truth masks.</p>"
    )


def _curves(y, scores, offset) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    anomalous, anomaly = y == -1, -np.asarray(scores)
    pictures = []
    if anomalous.any() and not anomalous.all():
        fpr, tpr, _ = roc_curve(anomalous, anomaly)
        figure, ax = plt.subplots(figsize=(4, 3.4))
        ax.plot(fpr, tpr, color="C0")
        ax.plot([0, 1], [0, 1], ":", color="gray")
        ax.set(
            xlabel="false positive rate (good flagged)",
            ylabel="true positive rate (defects found)",
            title="ROC (images)",
        )
        pictures.append(_png(figure))
        precision, recall, _ = precision_recall_curve(anomalous, anomaly)
        figure, ax = plt.subplots(figsize=(4, 3.4))
        ax.plot(recall, precision, color="C1")
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (images)",
               ylim=(0, 1.02))  # fmt: skip
        pictures.append(_png(figure))
    figure, ax = plt.subplots(figsize=(4, 3.4))
    bins = np.histogram_bin_edges(anomaly, bins=30)
    ax.hist(anomaly[~anomalous], bins=bins, alpha=0.6, label="good", color="C2")
    if anomalous.any():
        ax.hist(anomaly[anomalous], bins=bins, alpha=0.6, label="defective", color="C3")
    ax.axvline(-offset, color="black", linestyle="--", label="threshold")
    ax.set(xlabel="anomaly score", ylabel="images", title="Scores")
    ax.legend()
    pictures.append(_png(figure))
    images = "".join(f"<img src='{p}' alt='plot'>" for p in pictures)
    return f"<div class='plots'>{images}</div>"


def _cases(title: str, cases: list, note: str) -> str:
    if not cases:
        return f"<h2>{html.escape(title)}</h2><p class='note'>None.</p>"
    blocks = "".join(
        (
            f"<div class='case'><img src='{_png(picture)}' alt='map'><br>"
            if picture is not None
            else "<div class='case'>"
        )
        + f"{html.escape(caption)}</div>"
        for picture, caption in cases
    )
    return (
        f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(note)}</p>"
        f"<div class='cases'>{blocks}</div>"
    )


def write_report(
    folder,
    *,
    title: str,
    metrics: dict,
    y,
    scores,
    offset: float,
    false_positives: list,
    false_negatives: list,
    notes: list,
) -> str:
    """Write ``folder/report.html`` (atomically) and return its path.

    ``false_positives`` and ``false_negatives`` are ``(picture, caption)`` pairs: an
    RGB uint8 overlay (or None: the caption alone) and the text under it, worst
    first.
    """
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "report.html")
    y, scores = np.asarray(y), np.asarray(scores)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
        "<h2>Metrics</h2>",
        _table(metrics),
        "<h2>Curves and scores</h2>",
        _curves(y, scores, offset),
        _cases(
            "Worst false positives",
            false_positives,
            "Good images flagged at the threshold, most anomalous first (if none "
            "is flagged: the good images that came closest).",
        ),
        _cases(
            "Worst false negatives",
            false_negatives,
            "Defective images that passed, most normal first (if every defect is "
            "found: the ones that came closest to passing).",
        ),
        "</body></html>",
    ]
    with atomic_write(path) as handle:  # UTF-8, as the page says, on any locale
        handle.write("".join(parts).encode("utf-8"))
    return path
