"""``skdfm evaluate --report``: one self-contained HTML page a person reads.

The page holds everything inline (pictures as PNG data URIs, no script, no link to
fetch): a header saying which model made the scores (backbone, layer, input size,
pooling, where the weights came from, in red when they are random, the
configuration, both thresholds and how they were chosen, the skdfm version and
the model file); the metrics table, overall and per defect type; the counts at
the threshold (good passed and flagged, defects found and missed, the
false-reject and miss rates); the image ROC and precision-recall curves; the
histogram of good and defective scores with the threshold; thumbnails of the
worst mistakes, each image over its anomaly map on the model's colour scale; and
every missed defect and every false reject in a table. Plots need matplotlib (the
``plot`` extra). It takes a fitted Pipeline or an :class:`~skdfm.ExportedModel`.
"""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np

from .._core.files import atomic_write

__all__ = [
    "MAX_PICTURES",
    "confusion_counts",
    "model_description",
    "score_histogram",
    "write_report",
]

#: Most mistakes drawn over their maps (a second model pass over these images).
MAX_PICTURES = 8
#: Width of a thumbnail, in pixels: the picture is drawn at this size, so that its
#: caption is as readable as the page's text.
THUMBNAIL_WIDTH = 320

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.model th, table.model td { text-align: left; }
table.model th { background: #f4f4f4; font-weight: normal; color: #444; }
.alarm { color: #c00; font-weight: bold; }
.warning { color: #c00; border: 2px solid #c00; padding: 0.5em 0.8em; }
.plots img { width: 32%; min-width: 300px; }
.cases { display: flex; flex-wrap: wrap; gap: 1em; }
.case { width: 330px; font-size: 0.85em; word-break: break-all; }
.case img { width: 320px; }
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

#: How each threshold method chose the image threshold, in words.
_METHODS = {
    "contamination": "a quantile of good images' scores: about that share of good "
    "images is flagged",
    "f1": "the best F1 on labelled good and defective images",
}
#: How each method chose the pixel threshold, in words.
_PIXEL_METHODS = {
    "contamination": "a quantile of good images' map values",
    "f1": "the best F1 over the pixels of ground-truth masks",
}

_NOT_RECORDED = "not recorded (exported by an skdfm that did not record it)"


def _is_random(weights: str) -> bool:
    return weights.lower().startswith("random")


def _method(method, glosses=_METHODS) -> str:
    if method is None:
        return "method not recorded"
    for key, words in glosses.items():
        if str(method) == key or str(method).startswith(key + ","):
            return f"{method}: {words}"
    return str(method)


def _layers(layer) -> str:
    return layer if isinstance(layer, str) else " + ".join(str(v) for v in layer)


def model_description(model, model_file=None) -> list[tuple[str, str, bool]]:
    """What made the scores, as ``(field, value, alarm)`` rows of the report's
    header; ``alarm`` marks a value the reader must not miss (random weights).

    Parameters
    ----------
    model : Pipeline or ExportedModel
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)``, or an
        exported model (read from its ``metadata_``; a value an older export did
        not record says so).
    model_file : str or path-like, default=None
        The file the model was loaded from.
    """
    from .. import __version__
    from .._deploy.runtime import ExportedModel

    rows = []
    if model_file is not None:
        rows.append(("model file", os.path.abspath(model_file), False))
    if isinstance(model, ExportedModel):
        meta = model.metadata_
        rows.append(
            ("format", f"{meta.get('format', 'exported')} export, precision "
             f"{meta.get('precision', 'not recorded')}, run by {model.runtime_}",
             False)
        )  # fmt: skip
        backbone, layer = meta["backbone"], meta["layer"]
        size, pooling = meta["input_size"], meta.get("pooling_kernel_size")
        weights = meta.get("weights_source", _NOT_RECORDED)
        pca_level, n_components = meta.get("pca_level"), meta.get("n_components")
        score_type, image_score = meta["score_type"], meta.get("image_score")
        offset, method = float(meta["offset"]), meta.get("threshold_method")
        pixel = meta.get("pixel_threshold")
        pixel_method = meta.get("pixel_threshold_method")
        no_pixel = (
            "none: int8 exports carry none (int8 moves map values)"
            if meta.get("precision") == "int8"
            else "none"
        )
        version = (
            f"exported by skdfm {meta.get('skdfm_version', 'not recorded')}; "
            f"this report by skdfm {__version__}"
        )
        note = meta.get("threshold_note")
    else:
        from .._tools.model import split_model

        transformer, detector = split_model(model)
        if transformer is None:
            raise ValueError(
                "the report needs the images-to-scores model, a Pipeline("
                "DeepFeatureTransformer, DFMDetector), not a bare DFMDetector."
            )
        backbone = transformer.feature_params_["backbone"]
        layer, size = transformer.layer_, transformer.input_size_
        pooling = transformer.feature_params_["pooling_kernel_size"]
        weights = getattr(transformer, "weights_source_", None) or "not recorded"
        pca_level, n_components = detector.pca_level, detector.n_components_
        score_type, image_score = detector.score_type_, detector.image_score_
        offset = float(detector.offset_)
        method = getattr(detector, "threshold_method_", None)
        pixel = getattr(detector, "pixel_threshold_", None)
        pixel_method = getattr(detector, "pixel_threshold_method_", None)
        no_pixel = "none (calibrate_pixel_threshold sets one)"
        version = f"{__version__} (this report)"
        note = None
    components = (
        f"{n_components} components"
        if pca_level is None
        else f"pca_level {pca_level} \N{RIGHTWARDS ARROW} {n_components} components"
    )
    rows += [
        ("backbone", str(backbone), False),
        ("layer(s)", _layers(layer), False),
        ("input size", f"{size[0]} x {size[1]} px (height x width)", False),
        (
            "pooling",
            "not recorded"
            if pooling is None
            else f"{pooling} x {pooling} average pooling of the feature map",
            False,
        ),
        ("weights", str(weights), _is_random(str(weights))),
        (
            "configuration",
            f"{components}; score type {score_type}; image score "
            f"{image_score if image_score is not None else 'not recorded'}",
            False,
        ),
        (
            "image threshold",
            f"{-offset:.6g} (anomaly score; {_method(method)}); an image at or "
            "above it is flagged",
            False,
        ),
        (
            "pixel threshold",
            no_pixel
            if pixel is None
            else f"{float(pixel):.6g} (map value; "
            f"{_method(pixel_method, _PIXEL_METHODS)}); the mark on the maps' "
            "colour bar",
            False,
        ),
        *([("threshold note", str(note), False)] if note else []),
        ("skdfm", version, False),
    ]
    return rows


def _header(rows) -> str:
    alarmed = {True: "<td class='alarm'>", False: "<td>"}
    cells = "".join(
        f"<tr><th>{html.escape(field)}</th>{alarmed[alarm]}{html.escape(value)}"
        "</td></tr>"
        for field, value, alarm in rows
    )
    page = f"<table class='model'>{cells}</table>"
    weights = next((v for f, v, _ in rows if f == "weights"), "")
    if _is_random(weights):
        page += (
            "<p class='warning'>Random weights: the backbone was never trained ("
            f"{html.escape(weights)}). Every score, verdict and metric on this page "
            "comes from random features; fit with pretrained weights for results "
            "that say anything about the parts.</p>"
        )
    return page


def confusion_counts(y, labels) -> dict:
    """The counts at the threshold: ``good``, ``good_passed``, ``good_flagged``
    (false rejects), ``defective``, ``defects_found``, ``defects_missed``, and
    ``false_reject_rate`` (good flagged / good) and ``miss_rate`` (defects
    missed / defective), each None without images to divide by.

    ``y`` is 1 good, -1 defective; ``labels`` -1 flagged, 1 passed.
    """
    y, labels = np.asarray(y), np.asarray(labels)
    good, bad = y == 1, y == -1
    counts = {
        "good": int(good.sum()),
        "good_passed": int(np.sum(good & (labels == 1))),
        "good_flagged": int(np.sum(good & (labels == -1))),
        "defective": int(bad.sum()),
        "defects_found": int(np.sum(bad & (labels == -1))),
        "defects_missed": int(np.sum(bad & (labels == 1))),
    }
    counts["false_reject_rate"] = (
        counts["good_flagged"] / counts["good"] if counts["good"] else None
    )
    counts["miss_rate"] = (
        counts["defects_missed"] / counts["defective"] if counts["defective"] else None
    )
    return counts


def _rate(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}% ({part}/{whole})" if whole else "n/a"


def _confusion(y, labels, kinds) -> str:
    counts = confusion_counts(y, labels)
    rows = [
        ("good", counts["good"], f"{counts['good_passed']} passed",
         f"{counts['good_flagged']} flagged (false rejects)",
         f"false-reject rate {_rate(counts['good_flagged'], counts['good'])}"),
        ("defective, all types", counts["defective"],
         f"{counts['defects_missed']} missed", f"{counts['defects_found']} found",
         f"miss rate {_rate(counts['defects_missed'], counts['defective'])}"),
    ]  # fmt: skip
    kinds = np.asarray(kinds, dtype=object)
    for kind in sorted(set(kinds[np.asarray(y) == -1])):
        of = kinds == kind
        part = confusion_counts(np.asarray(y)[of], np.asarray(labels)[of])
        rows.append(
            (f"defective: {kind}", part["defective"],
             f"{part['defects_missed']} missed", f"{part['defects_found']} found",
             f"miss rate {_rate(part['defects_missed'], part['defective'])}")
        )  # fmt: skip
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return (
        "<table><tr><th>images</th><th>count</th><th>passed (below the threshold)"
        "</th><th>flagged (at or above)</th><th>rate</th></tr>"
        f"{body}</table><p class='note'>At the model's image threshold: a good "
        "image flagged is a false reject; a defective image that passes is a "
        "missed defect.</p>"
    )


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


def score_histogram(y, scores, offset):
    """The matplotlib figure of good and defective images' anomaly scores, the
    threshold ``-offset`` marked; its y axis counts images (integer ticks)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    y, anomaly = np.asarray(y), -np.asarray(scores, dtype=np.float64)
    anomalous = y == -1
    figure, ax = plt.subplots(figsize=(4, 3.4))
    bins = np.histogram_bin_edges(np.r_[anomaly, -offset], bins=30)
    ax.hist(anomaly[~anomalous], bins=bins, alpha=0.6, label="good", color="C2")
    if anomalous.any():
        ax.hist(anomaly[anomalous], bins=bins, alpha=0.6, label="defective", color="C3")
    ax.axvline(-offset, color="black", linestyle="--", label="image threshold")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="anomaly score", ylabel="images", title="Scores")
    ax.legend()
    return figure


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
    pictures.append(_png(score_histogram(y, scores, offset)))
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


def _mistakes(title: str, rows: list, none: str) -> str:
    """Every mistake of one kind: file, defect type, score, margin."""
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(none)}</p>"
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(kind)}</td>"
        f"<td>{score:.6g}</td><td>{margin:+.4g}</td></tr>"
        for name, kind, score, margin in rows
    )
    return (
        f"<h2>{html.escape(title)} ({len(rows)})</h2><table><tr><th>file</th>"
        "<th>defect type</th><th>anomaly score</th><th>margin (score - threshold)"
        f"</th></tr>{body}</table>"
    )


def _verdict(truth: int, label: int) -> str:
    if truth == 1:
        return "flagged" if label == -1 else "passed"
    return "found" if label == -1 else "missed"


def _thumbnail(path, amap, mask, scale, caption):
    """The image over its map, drawn ``THUMBNAIL_WIDTH`` wide (the caption's
    font then matches the page's), as an RGB array."""
    from PIL import Image

    from .._imaging.decode import decode_image_file
    from .map_files import overlay_picture

    image = decode_image_file(path)
    if image.width != THUMBNAIL_WIDTH:  # small images grow, pixels kept sharp
        height = max(1, round(image.height * THUMBNAIL_WIDTH / image.width))
        smaller = image.width > THUMBNAIL_WIDTH
        image = image.resize(
            (THUMBNAIL_WIDTH, height),
            Image.Resampling.BILINEAR if smaller else Image.Resampling.NEAREST,
        )
    picture = overlay_picture(image, amap, scale=scale, caption=caption, mask=mask)
    return np.asarray(picture)


def _scorer(model):
    """What holds the thresholds: the exported model itself, or the detector."""
    from .._deploy.runtime import ExportedModel
    from .._tools.model import split_model

    return model if isinstance(model, ExportedModel) else split_model(model)[1]


def _maps_of(model, paths):
    from .._deploy.runtime import ExportedModel

    if isinstance(model, ExportedModel):
        return model.anomaly_maps(paths, size="image").maps
    from .._tools.maps import anomaly_maps

    return anomaly_maps(model, paths, size="image").maps


def write_report(folder, model, result, *, model_file=None, category=None) -> str:
    """Write ``folder/report.html`` (atomically) and return its path.

    Parameters
    ----------
    folder : str or path-like
        Made if missing.
    model : Pipeline or ExportedModel
        The model that scored ``result``; its header rows come from
        :func:`model_description`, and the worst mistakes (at most
        :data:`MAX_PICTURES`) are scored again to draw their maps.
    result : MVTecEvaluation
        :func:`~skdfm._evaluation.evaluation.evaluate_mvtec`'s result.
    model_file, category : str or path-like, default=None
        Named in the header.
    """
    from .map_files import colour_scale

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "report.html")
    y, scores, labels = (np.asarray(v) for v in (result.y, result.score_samples,
                                                 result.labels))  # fmt: skip
    kinds, masks = result.defect_types, result.masks
    scorer = _scorer(model)
    offset = float(scorer.offset_)
    threshold, anomaly = -offset, -scores
    files = [result.data.paths[k] for k in result.index]
    root = None if category is None else os.path.abspath(category)

    def shown(file):  # a file under the category by its place in it
        file = os.path.abspath(file)
        if root is not None and file.startswith(root + os.sep):
            return os.path.relpath(file, root)
        return file

    good, bad = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    flagged_good = good[labels[good] == -1]
    missed = bad[labels[bad] == 1]
    # every mistake, worst first: false rejects most anomalous, misses most normal
    flagged_good = flagged_good[np.argsort(-anomaly[flagged_good], kind="stable")]
    missed = missed[np.argsort(anomaly[missed], kind="stable")]

    def closest(pool, fallback, key):  # the mistakes, else the closest calls
        pool = pool if len(pool) else fallback
        return pool[np.argsort(key(pool), kind="stable")]

    fp_pool = closest(flagged_good, good, lambda p: -anomaly[p])
    fn_pool = closest(missed, bad, lambda p: anomaly[p])
    # closest calls (no mistake of that kind) take half the pictures at most
    fp_pool = fp_pool if len(flagged_good) else fp_pool[: MAX_PICTURES // 2]
    fn_pool = fn_pool if len(missed) else fn_pool[: MAX_PICTURES // 2]
    n_fp = min(len(fp_pool), MAX_PICTURES // 2)
    n_fn = min(len(fn_pool), MAX_PICTURES - n_fp)
    n_fp = min(len(fp_pool), MAX_PICTURES - n_fn)
    picked = [*fp_pool[:n_fp], *fn_pool[:n_fn]]

    def caption(i):
        return (
            f"{kinds[i]}: anomaly score {anomaly[i]:.4g} (image threshold "
            f"{threshold:.4g}): {_verdict(y[i], labels[i])}"
        )

    pictures = []
    if picked and result.has_maps:
        drawn = _maps_of(model, [files[i] for i in picked])
        scale = colour_scale(scorer)
        for j, i in enumerate(picked):
            mask = masks[i] if masks[i] is not None and masks[i].any() else None
            picture = _thumbnail(files[i], drawn[j], mask, scale, caption(i))
            pictures.append((picture, shown(files[i])))
    else:  # nll: no maps to draw, the files and scores still say which
        pictures = [(None, f"{shown(files[i])}: {caption(i)}") for i in picked]

    def listed(index):
        return [
            (shown(files[i]), str(kinds[i]), float(anomaly[i]),
             float(anomaly[i] - threshold))
            for i in index
        ]  # fmt: skip

    notes = []
    if category is not None:
        notes.append(f"Category: {os.path.abspath(category)}.")
    if result.skipped:
        notes.append(f"{len(result.skipped)} unreadable images left out.")
    if result.has_maps:
        notes.append(
            "Maps on one colour scale, the pixel threshold in its middle, true "
            "defects outlined in green; titles and captions compare each image's "
            "anomaly score with the image threshold."
        )
    category_name = "" if category is None else os.path.basename(root)
    title = f"skdfm evaluation: {category_name}".rstrip(": ")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Model</h2>",
        _header(model_description(model, model_file)),
        "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
        "<h2>Metrics</h2>",
        _table(result.metrics),
        "<h2>At the threshold</h2>",
        _confusion(y, labels, kinds),
        "<h2>Curves and scores</h2>",
        _curves(y, scores, offset),
        _cases(
            "Worst false positives: good images flagged (false rejects)",
            pictures[:n_fp],
            "Good images flagged at the threshold, most anomalous first (if none "
            "is flagged: the good images that came closest).",
        ),
        _cases(
            "Worst false negatives: defects missed",
            pictures[n_fp:],
            "Defective images that passed, most normal first (if every defect is "
            "found: the ones that came closest to passing).",
        ),
        _mistakes("Every missed defect", listed(missed), "None: every defect found."),
        _mistakes(
            "Every false reject", listed(flagged_good), "None: every good image passed."
        ),
        "</body></html>",
    ]
    with atomic_write(path) as handle:  # UTF-8, as the page says, on any locale
        handle.write("".join(parts).encode("utf-8"))
    return path
