"""Decision thresholds calibrated on validation images; scores normalised around them.

A detector's threshold is its ``offset_`` (``predict`` flags a sample when
``score_samples < offset_``). ``fit`` sets it from the training scores
(``contamination``); :func:`calibrate_threshold` replaces it with one taken from
images the model did not see, and records the score range that
:func:`normalized_scores` maps to [0, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import precision_recall_curve

from .._core.validation import (
    check_contamination,
    check_labels_and_scores,
    check_outlier_labels,
)
from .._deploy.results import normalize_scores
from .model import split_model

__all__ = [
    "calibrate_pixel_threshold",
    "calibrate_pixel_threshold_from_features",
    "calibrate_threshold",
    "f1_adaptive_threshold",
    "masks_at_input_size",
    "normalized_scores",
]


def _just_above(value: float) -> float:
    """The smallest float above ``value``: ``s < _just_above(v)`` iff ``s <= v``."""
    return float(np.nextafter(value, np.inf))


def f1_adaptive_threshold(y_true, y_score) -> float:
    """The offset that maximises the F1 score of flagging anomalous images.

    anomalib's F1-adaptive threshold in scikit-learn's conventions: among the
    thresholds at the distinct scores, the one with the highest F1 (anomalous
    images as the positive class; the first maximum over increasing thresholds,
    as anomalib takes it). The returned offset flags a sample when
    ``score < offset``, exactly the samples anomalib flags
    (``anomaly score >= threshold``).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        ``1`` normal, ``-1`` anomalous (0/1 labels raise).
    y_score : array-like of shape (n_samples,)
        Higher = more normal (``score_samples``).

    Returns
    -------
    offset : float
        In the units of ``y_score``. With no anomalous sample, F1 is undefined:
        like anomalib, the threshold falls back to the most anomalous score (with
        a warning).

    Examples
    --------
    >>> from skdfm import f1_adaptive_threshold
    >>> scores = [-1.0, -1.2, -1.1, -5.0, -3.0, -1.05]
    >>> labels = [1, 1, 1, -1, -1, -1]
    >>> offset = f1_adaptive_threshold(labels, scores)
    >>> [int(s < offset) for s in scores]  # 1 = flagged
    [0, 0, 0, 1, 1, 0]
    """
    y_true, y_score = check_labels_and_scores(y_true, y_score)
    anomaly_score = -y_score
    if not (y_true == -1).any():
        warnings.warn(
            "No anomalous sample in y_true: the F1 score is undefined, so the "
            "threshold falls back to the most anomalous score (as anomalib does); "
            "calibrate with method='contamination' on normal images instead.",
            UserWarning,
            stacklevel=2,
        )
        return _just_above(float(y_score.min()))
    precision, recall, thresholds = precision_recall_curve(y_true == -1, anomaly_score)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1], nan=0.0)  # the last point has no threshold
    best = float(thresholds[int(np.argmax(f1))])
    return _just_above(-best)


def calibrate_threshold(model, X, y=None, *, method="f1", contamination=0.01):
    """Set a fitted model's threshold from validation images it was not fitted on.

    The training scores that ``fit`` takes its ``offset_`` from are optimistic
    (see :class:`~skdfm.DFMDetector`), so a threshold is best taken from other
    images. This scores ``X`` once and sets, in place, the detector's ``offset_``
    (so ``predict`` and ``decision_function`` use the new threshold),
    ``threshold_method_`` and ``score_range_`` (the range of the scores of ``X``,
    used by :func:`normalized_scores`).

    Parameters
    ----------
    model : Pipeline or DFMDetector
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)`` or detector.
    X : images or feature rows
        Validation samples, not used for fitting.
    y : array-like of shape (n_samples,), default=None
        ``1`` normal, ``-1`` anomalous (0/1 labels raise). Required by ``"f1"``.
    method : {"f1", "contamination"}, default="f1"
        ``"f1"``: the F1-adaptive threshold of anomalib (labelled normal and
        anomalous samples). ``"contamination"``: the ``contamination`` quantile of
        the scores of the normal samples (all of ``X`` when ``y`` is None), for
        when only good parts are at hand: about that share of new good parts
        will be flagged.
    contamination : float in (0, 0.5], default=0.01
        Used by ``"contamination"`` only.

    Returns
    -------
    model : Pipeline or DFMDetector
        The same model, its threshold replaced.

    Examples
    --------
    >>> import numpy as np
    >>> from skdfm import DFMDetector, calibrate_threshold
    >>> rng = np.random.default_rng(0)
    >>> basis = rng.normal(size=(5, 40))
    >>> def normal(n):
    ...     return rng.normal(size=(n, 5)) @ basis + 0.1 * rng.normal(size=(n, 40))
    >>> det = DFMDetector(pca_level=5, device="cpu").fit(normal(100))
    >>> X_val = np.vstack([normal(50), normal(10) + rng.normal(size=(10, 40))])
    >>> y_val = np.r_[np.ones(50), -np.ones(10)].astype(int)
    >>> _ = calibrate_threshold(det, X_val, y_val, method="f1")
    >>> det.threshold_method_, float(np.mean(det.predict(X_val) == y_val)) > 0.9
    ('f1', True)
    """
    _, detector = split_model(model)
    if method not in ("f1", "contamination"):
        raise ValueError(f"method={method!r} must be 'f1' or 'contamination'.")
    if method == "contamination":
        contamination = check_contamination(contamination)
    if y is not None:
        y = check_outlier_labels(y)
    scores = model.score_samples(X)
    if y is not None and len(y) != len(scores):
        raise ValueError(f"X has {len(scores)} samples but y has {len(y)} labels.")
    if method == "f1":
        if y is None:
            raise ValueError(
                "method='f1' needs labels y (1 normal, -1 anomalous); with normal "
                "images only, use method='contamination'."
            )
        offset = f1_adaptive_threshold(y, scores)
        detector.set_threshold(scores, offset=offset, method="f1")
        return model
    normal = scores if y is None else scores[y == 1]
    if len(normal) == 0:
        raise ValueError("method='contamination' needs normal samples (y == 1).")
    detector.set_threshold(normal, contamination=contamination)
    return model


def pixel_threshold_of(maps, masks=None, *, pixel_contamination=0.001):
    """``(threshold, method)`` from anomaly maps: F1-adaptive over the pixels of
    ``masks`` when given, else the ``1 - pixel_contamination`` quantile of the
    maps' values (all of normal images)."""
    values = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps])
    if masks is None:
        if not 0 < pixel_contamination < 1:
            raise ValueError(
                f"pixel_contamination={pixel_contamination!r} must be in (0, 1)."
            )
        return float(np.quantile(values, 1 - pixel_contamination)), "contamination"
    if len(masks) != len(maps):
        raise ValueError(f"{len(maps)} images but {len(masks)} masks.")
    truth = []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(mask)
        if mask.shape != np.shape(amap):
            raise ValueError(
                f"mask {i} has shape {mask.shape} but its image's map is "
                f"{np.shape(amap)}: masks are at the images' own size."
            )
        truth.append(mask.astype(bool).ravel())
    truth = np.concatenate(truth)
    if not truth.any():
        raise ValueError(
            "the masks have no defective pixel: F1 needs some; with good images "
            "only, pass no masks (a quantile of their maps)."
        )
    # anomalib's F1-adaptive pixel threshold: at the distinct map values, the one
    # of the highest F1 (the first maximum of the increasing thresholds, as
    # anomalib takes it: the lowest threshold among ties)
    precision, recall, thresholds = precision_recall_curve(truth, values)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return float(thresholds[int(np.argmax(f1[:-1]))]), "f1"


def _maps_at_input_size(transformer, detector, features, chunk_size: int = 64):
    """The anomaly maps of feature rows at the transformer's input size,
    ``chunk_size`` rows at a time; float64, as :func:`~skdfm.anomaly_maps` gives
    them, so that a threshold at a map value flags that very pixel."""
    from .maps import upsample

    maps = []
    for start in range(0, len(features), chunk_size):
        _, grid = detector.score_samples_with_grid(
            features[start : start + chunk_size], transformer.feature_shape_
        )
        maps.extend(upsample(grid, transformer.input_size_).cpu().numpy())
    return maps


def _nearest_resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask resized by its nearest pixel centres (PIL's ``NEAREST``)."""
    rows = np.minimum(
        ((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(np.intp),
        mask.shape[0] - 1,
    )
    cols = np.minimum(
        ((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(np.intp),
        mask.shape[1] - 1,
    )
    return mask[rows[:, None], cols[None, :]]


def masks_at_input_size(masks, sizes, input_size):
    """Masks given at each image's size, checked, brought to the input size (by
    their nearest pixel): what the pixel threshold's rule compares maps with."""
    if len(masks) != len(sizes):
        raise ValueError(f"{len(sizes)} images but {len(masks)} masks.")
    resized = []
    for i, (mask, size) in enumerate(zip(masks, sizes, strict=True)):
        mask = np.asarray(mask).astype(bool)
        if mask.shape != tuple(size):
            raise ValueError(
                f"mask {i} has shape {mask.shape} but its image is {tuple(size)}: "
                "masks are at the images' own size."
            )
        resized.append(_nearest_resize(mask, tuple(input_size)))
    return resized


def calibrate_pixel_threshold_from_features(
    model, features, masks=None, *, pixel_contamination=0.001
):
    """Set the pixel threshold from feature rows: the one pixel-threshold rule.

    What :func:`calibrate_pixel_threshold` (images in) and the command's fits
    (feature rows they already have) both use. The anomaly maps of ``features``
    are taken at the model's **input size**, not at each image's own size:

    * every image weighs the same in the threshold, whatever its size (at the
      images' sizes, a quantile over images of mixed sizes is mostly that of the
      largest ones);
    * the maps come from the feature rows alone, so a fit that kept its rows (and
      not its images) can set the threshold without decoding anything again;
    * it is where anomalib takes its pixel threshold (the masks resized with the
      images to the model's input).

    The values are on one scale at any size (each map is the same grid upsampled
    bilinearly), so the threshold applies to maps of any size
    (:func:`~skdfm.anomaly_maps` with ``size="image"``).

    Parameters
    ----------
    model : Pipeline
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)`` with
        ``score_type="fre"``.
    features : ndarray or torch.Tensor of shape (n_images, n_features)
        Feature rows of validation images from ``model[0]`` (``transform``), not
        used for fitting.
    masks : sequence of 2-D arrays, default=None
        Ground truth of the images (True on defective pixels), at the model's
        input size (``model[0].input_size_``). With masks, the threshold is
        anomalib's F1-adaptive one over all their pixels; without, the
        ``1 - pixel_contamination`` quantile of the maps' values, which must then
        be of good images.
    pixel_contamination : float in (0, 1), default=0.001
        Share of good pixels flagged, without ``masks``.

    Returns
    -------
    model : Pipeline
        The same model, with ``pixel_threshold_`` and ``pixel_threshold_method_``
        set on its detector.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from skdfm import DeepFeatureTransformer, DFMDetector, make_defect_images
    >>> from skdfm._tools.thresholds import calibrate_pixel_threshold_from_features
    >>> images, y, _ = make_defect_images(20, 0, image_size=64, random_state=0)
    >>> model = make_pipeline(
    ...     DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                            input_size=64, device="cpu", random_state=0),
    ...     DFMDetector(pca_level=0.9, device="cpu"),
    ... ).fit(images[:14])
    >>> rows = model[0].transform(images[14:])
    >>> _ = calibrate_pixel_threshold_from_features(model, rows,
    ...                                             pixel_contamination=0.01)
    >>> model[-1].pixel_threshold_method_
    'contamination'
    """
    from .._kernels.scores import check_has_grid

    transformer, detector = split_model(model)
    if transformer is None:
        raise ValueError(
            "the pixel threshold is taken from maps at the model's input size: "
            "pass the Pipeline (DeepFeatureTransformer + DFMDetector), not a bare "
            "DFMDetector."
        )
    check_has_grid(detector.score_type)
    maps = _maps_at_input_size(transformer, detector, features)
    threshold, method = pixel_threshold_of(
        maps, masks, pixel_contamination=pixel_contamination
    )
    detector.set_pixel_threshold(threshold, method=method)
    return model


def calibrate_pixel_threshold(model, X, masks=None, *, pixel_contamination=0.001):
    """Set the anomaly-map threshold that predicts defect masks.

    Computes the anomaly maps of ``X`` (one backbone pass) and sets the
    detector's ``pixel_threshold_``: with ``masks``, anomalib's F1-adaptive
    threshold over all their pixels; without, the ``1 - pixel_contamination``
    quantile of the map values of ``X``, which must then be good images not used
    for fitting (about that share of their pixels is then flagged).
    :func:`~skdfm.anomaly_maps` then returns predicted masks, and the command's
    overlays are coloured on one scale centred there.

    The maps (and the masks, resized by their nearest pixel) are taken at the
    model's input size, so that each image weighs the same: the rule of
    :func:`calibrate_pixel_threshold_from_features`, which the command's fits
    use too.

    Parameters
    ----------
    model : Pipeline
        A fitted ``Pipeline(DeepFeatureTransformer, DFMDetector)`` with
        ``score_type="fre"``.
    X : images
        Validation images, not used for fitting.
    masks : sequence of 2-D arrays, default=None
        Ground truth of ``X`` (True on defective pixels), at each image's size.
    pixel_contamination : float in (0, 1), default=0.001
        Share of good pixels flagged, without ``masks``.

    Returns
    -------
    model : Pipeline
        The same model, with ``pixel_threshold_`` and ``pixel_threshold_method_``.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from skdfm import (DeepFeatureTransformer, DFMDetector, anomaly_maps,
    ...                    calibrate_pixel_threshold, make_defect_images)
    >>> images, y, masks = make_defect_images(20, 6, image_size=64, random_state=0)
    >>> model = make_pipeline(
    ...     DeepFeatureTransformer(backbone="resnet18", pretrained=False,
    ...                            input_size=64, device="cpu", random_state=0),
    ...     DFMDetector(pca_level=0.9, device="cpu"),
    ... ).fit(images[y == 1][:14])
    >>> _ = calibrate_pixel_threshold(model, images[14:], masks[14:])
    >>> model[-1].pixel_threshold_method_
    'f1'
    >>> anomaly_maps(model, images[:2]).masks.shape
    (2, 64, 64)
    """
    from .._kernels.scores import check_has_grid

    transformer, detector = split_model(model)
    if transformer is None:
        raise ValueError(
            "calibrate_pixel_threshold takes images: pass the Pipeline "
            "(DeepFeatureTransformer + DFMDetector), not a bare DFMDetector."
        )
    check_has_grid(detector.score_type)  # before the backbone runs
    if masks is None:
        features = transformer.transform(X)
    else:
        features, sizes = transformer.transform_with_sizes(X)
        masks = masks_at_input_size(masks, sizes, transformer.input_size_)
    return calibrate_pixel_threshold_from_features(
        model, features, masks, pixel_contamination=pixel_contamination
    )


def normalized_scores(model, X) -> np.ndarray:
    """Anomaly scores min-max normalised to [0, 1] around the threshold, as anomalib.

    ``clip((offset_ - s) / (max - min) + 0.5, 0, 1)`` where ``s`` is
    ``score_samples`` and ``(min, max)`` is the detector's ``score_range_``: higher
    = more anomalous, **0.5 exactly at the threshold**, above 0.5 for the samples
    ``predict`` flags. The scale is that of the images the threshold came from
    (the training images after ``fit``, the validation images after
    :func:`calibrate_threshold`), so use it for display and for comparing with
    0.5, not as a probability.

    Parameters
    ----------
    model : Pipeline or DFMDetector
        A fitted model.
    X : images or feature rows

    Returns
    -------
    scores : ndarray of shape (n_samples,), float64 in [0, 1]
    """
    _, detector = split_model(model)
    return normalize_scores(
        model.score_samples(X), detector.offset_, detector.score_range_
    )
