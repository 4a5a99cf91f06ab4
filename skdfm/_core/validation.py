"""Checks scikit-learn's constraints and ``validate_data`` do not make.

Parameters (bools refused as numbers, ``contamination``, ``threshold_cv`` against
the rows), feature rows (tensors checked on their device, magnitudes float64 can
square) and fitted state read from a file (the checks an estimator's table of
fitted attributes names).
"""

from __future__ import annotations

import math
import reprlib
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import InvalidParameterError

__all__ = [
    "OutlierLabelWarning",
    "a_string",
    "as_host_array",
    "check_contamination",
    "check_device_rows",
    "check_labels_and_scores",
    "check_magnitude",
    "check_outlier_labels",
    "check_pixel_threshold",
    "check_real",
    "check_threshold",
    "check_threshold_cv",
    "check_unchanged_since_fit",
    "count_at_least",
    "finite_float_array",
    "finite_floats",
    "finite_number",
    "largest_magnitude",
    "layer_names",
    "normal_rows",
    "number_range",
    "one_of",
    "positive_ints",
    "reject_bools",
    "strings",
]


def reject_bools(estimator, names) -> None:
    """A bool is an int to Python and to scikit-learn's ``Interval``: ``True`` would
    mean one component or layer 1. Refuse it for numeric parameters."""
    for name in names:
        value = getattr(estimator, name)
        if isinstance(value, (bool, np.bool_)):
            raise InvalidParameterError(
                f"The {name!r} parameter of {type(estimator).__name__} must be a "
                f"number, not a bool; got {value!r}."
            )


#: DFM squares feature values in float64 (range ~1e-308 .. 1e308): beyond these
#: magnitudes squares and their sums overflow to inf, or variances underflow to 0.
_LARGEST_FEATURE, _SMALLEST_FEATURE = 1e150, 1e-150


def check_magnitude(largest: float, *, fitting: bool) -> None:
    """Refuse finite features whose squares float64 cannot hold (never NaN scores)."""
    if largest > _LARGEST_FEATURE:
        raise ValueError(
            f"X has values of magnitude up to {largest:.3g}: DFM squares feature "
            f"values in float64, which overflows above {_LARGEST_FEATURE:g}. Divide "
            "the features by a constant (the same for fit and scoring) first."
        )
    if fitting and 0 < largest < _SMALLEST_FEATURE:
        raise ValueError(
            f"X has values no larger than {largest:.3g}: their squares underflow "
            f"float64 below {_SMALLEST_FEATURE:g}, so no variance could be "
            "measured. Multiply the features by a constant (the same for fit and "
            "scoring) first."
        )


def check_contamination(contamination) -> float:
    """``contamination`` as a float in (0, 0.5], or a ValueError naming it."""
    if (
        isinstance(contamination, bool)
        or not isinstance(contamination, Real)
        or not 0 < contamination <= 0.5
    ):
        raise ValueError(
            f"contamination={contamination!r} must be a float in (0, 0.5]."
        )
    return float(contamination)


def check_threshold(scores, contamination, offset, method):
    """``(scores, offset, method)`` of ``set_threshold``'s arguments: finite float64
    scores, and the ``contamination`` quantile of them (method ``"contamination"``
    unless named) or the finite ``offset`` given with the ``method`` that chose it."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.isfinite(scores).all():
        raise ValueError(
            "set_threshold needs at least one score, all finite; got "
            f"{scores.size} score(s)."
        )
    if (contamination is None) == (offset is None):
        raise ValueError("Pass exactly one of contamination and offset.")
    if contamination is not None:
        contamination = check_contamination(contamination)
        offset = np.percentile(scores, 100.0 * contamination)
        method = "contamination" if method is None else method
    elif not isinstance(method, str) or not np.isfinite(offset):
        raise ValueError(
            "set_threshold(offset=...) needs a finite offset and method, the "
            f"name of how it was chosen; got offset={offset!r}, method={method!r}."
        )
    return scores, float(offset), method


def check_threshold_cv(threshold_cv: int, n_samples: int) -> None:
    """Cross-fitting fits each fold's model on the other folds: 2 rows per fold."""
    if n_samples < 2 * threshold_cv:
        raise ValueError(
            f"threshold_cv={threshold_cv} needs at least {2 * threshold_cv} samples "
            f"(2 per fold to fit on), got {n_samples}."
        )


# -- feature rows --------------------------------------------------------------------


def as_host_array(X):
    """Torch tensors (any device, any float dtype) to numpy; other inputs unchanged."""
    if isinstance(X, torch.Tensor):
        X = X.detach()
        if X.is_floating_point() and X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        return X.cpu().numpy()
    return X


def check_real(X, what: str = "X") -> None:
    """Refuse complex input in one line: scikit-learn's own message prints the whole
    array (megabytes for a feature matrix)."""
    dtype = getattr(X, "dtype", None)
    if dtype is None and hasattr(X, "dtypes"):  # a DataFrame: one dtype per column
        kinds = {getattr(kind, "kind", "O") for kind in X.dtypes}
        complex_ = "c" in kinds
    elif dtype is None:  # a list: what numpy makes of it
        try:
            complex_ = np.iscomplexobj(np.asarray(X))
        except (ValueError, TypeError):  # ragged: validate_data says so
            complex_ = False
    else:
        complex_ = getattr(dtype, "kind", None) == "c"
    if complex_:
        raise ValueError(
            f"Complex data not supported: {what} has complex values; the detector "
            "takes real feature rows."
        )


def check_device_rows(
    X: torch.Tensor, min_samples: int, n_features_in: int | None = None
) -> torch.Tensor:
    """``validate_data``'s checks of a feature matrix, done on its device (no copy to
    the host); float32 or float64 rows back. With ``n_features_in``, the rows must
    have that many features (the caller records it when fitting)."""
    X = X.detach()
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2D array of feature rows, got a {X.ndim}D tensor of "
            f"shape {tuple(X.shape)}."
        )
    if X.is_complex():
        raise ValueError("Complex data not supported.")
    if X.dtype not in (torch.float32, torch.float64):
        X = X.to(torch.float32 if X.is_floating_point() else torch.float64)
    n_samples, n_features = X.shape
    if n_samples < min_samples:
        raise ValueError(
            f"Found array with {n_samples} sample(s) (shape={tuple(X.shape)}) "
            f"while a minimum of {min_samples} is required."
        )
    if n_features == 0:
        raise ValueError(
            "Found array with 0 feature(s) while a minimum of 1 is required."
        )
    if not bool(torch.isfinite(X).all()):
        raise ValueError("Input X contains NaN or infinity.")
    if n_features_in is not None and n_features != n_features_in:
        raise ValueError(
            f"X has {n_features} features, but the detector is expecting "
            f"{n_features_in} features as input."
        )
    return X


def largest_magnitude(X) -> float:
    """``max(|X|)`` of a numpy array or a tensor, without a copy of ``X``."""
    if isinstance(X, torch.Tensor):
        low, high = torch.aminmax(X)
        return max(float(high), -float(low))
    return max(float(X.max()), -float(X.min()))


# -- fitted state read from a file ----------------------------------------------------
# Checks of a loaded fitted attribute, as named in an estimator's table of them
# (``FittedAttribute.check``): ``check(name, value, sizes) -> value``, ``sizes``
# naming the dimensions (``{"d": n_features_in_, "k": n_components_}``). Each raises
# a ValueError naming the attribute.


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
_shown = _SHORT.repr  # a value read from a (maybe forged) file, shortened


def _finite_real(value) -> bool:
    """A real number (not a bool) float64 holds finite (10**400 does not)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def finite_float_array(
    *dims: str, minimum: float | None = None, maximum: float | None = None
):
    """A finite float32 or float64 ndarray (what fits make) whose shape is ``dims``
    looked up in ``sizes``, its values within ``[minimum, maximum]`` when given."""

    def check(name, value, sizes):
        shape = tuple(sizes[dim] for dim in dims)
        if not (
            isinstance(value, np.ndarray)
            and value.shape == shape
            and value.dtype in (np.float32, np.float64)
            and np.isfinite(value).all()
        ):
            raise ValueError(
                f"{name} is not a finite float32 or float64 array of shape {shape}."
            )
        if value.size and (
            (minimum is not None and value.min() < minimum)
            or (maximum is not None and value.max() > maximum)
        ):
            bounds = f"[{'-inf' if minimum is None else minimum}, "
            bounds += f"{'inf' if maximum is None else maximum}]"
            raise ValueError(
                f"{name} holds values outside {bounds} (from {value.min():.6g} to "
                f"{value.max():.6g}): no fit makes them."
            )
        return value

    return check


def finite_floats(n: int, *, positive: bool = False):
    """A tuple of ``n`` finite numbers (a list read from a file becomes the
    tuple), each > 0 when ``positive``."""

    def check(name, value, sizes):
        if not (
            isinstance(value, (tuple, list))
            and len(value) == n
            and all(_finite_real(v) and (v > 0 or not positive) for v in value)
        ):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise ValueError(f"{name}={_shown(value)} is not {n} {kind}.")
        return tuple(float(v) for v in value)

    return check


def positive_ints(n: int):
    """A tuple of ``n`` ints >= 1, not bools (a list read from a file becomes the
    tuple)."""

    def check(name, value, sizes):
        if not (
            isinstance(value, (tuple, list))
            and len(value) == n
            and all(
                isinstance(v, Integral) and not isinstance(v, bool) and v >= 1
                for v in value
            )
        ):
            raise ValueError(f"{name}={_shown(value)} is not {n} positive ints.")
        return tuple(int(v) for v in value)

    return check


def number_range(name, value, sizes):
    """``(min, max)``: two finite numbers, ``min <= max``, as a tuple of floats."""
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(_finite_real(v) for v in value)
    ):
        raise ValueError(
            f"{name}={_shown(value)} is not a (min, max) pair of finite numbers."
        )
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise ValueError(f"{name}={_shown(value)} is reversed: min > max.")
    return (low, high)


def one_of(*options: str):
    """One of the strings ``options``."""

    def check(name, value, sizes):
        if not (isinstance(value, str) and value in options):
            raise ValueError(
                f"{name}={_shown(value)} is not one of "
                f"{', '.join(repr(option) for option in options)}."
            )
        return value

    return check


def strings(dim: str):
    """A 1-D ndarray of ``sizes[dim]`` str (feature names)."""

    def check(name, value, sizes):
        if not (
            isinstance(value, np.ndarray)
            and value.shape == (sizes[dim],)
            and all(isinstance(v, str) for v in value)
        ):
            raise ValueError(
                f"{name} is not an array of {sizes[dim]} str (one per feature)."
            )
        return value

    return check


def layer_names(name, value, sizes):
    """A layer name, or a non-empty tuple of them (a list becomes the tuple)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, str) for v in value)
    ):
        return tuple(value)
    raise ValueError(f"{name}={_shown(value)} is not a layer name or a tuple of them.")


def count_at_least(minimum: int):
    """An int (not a bool) of at least ``minimum``."""

    def check(name, value, sizes):
        if isinstance(value, bool) or not (
            isinstance(value, Integral) and value >= minimum
        ):
            raise ValueError(f"{name}={_shown(value)} is not a count >= {minimum}.")
        return value

    return check


def finite_number(minimum: float | None = None):
    """A finite real number (not a bool), at least ``minimum`` when given."""

    def check(name, value, sizes):
        if not _finite_real(value) or (minimum is not None and value < minimum):
            at_least = "" if minimum is None else f" >= {minimum:g}"
            raise ValueError(
                f"{name}={_shown(value)} is not a finite number{at_least}."
            )
        return value

    return check


def a_string(name, value, sizes):
    """A str."""
    if not isinstance(value, str):
        raise ValueError(f"{name}={_shown(value)} is not a str.")
    return value


def check_outlier_labels(y, *, name: str = "y") -> np.ndarray:
    """Validate image labels: +1 normal, -1 anomalous; anything else is an error.

    0/1 labels are refused rather than guessed: in anomalib and PyOD ``1`` means
    anomalous, in scikit-learn ``1`` means normal, and reading one as the other
    silently turns an AUROC ``a`` into ``1 - a``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of image labels, got shape {y.shape}."
        )
    if y.dtype == bool or y.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must hold the integers 1 (normal) and -1 (anomalous), got dtype "
            f"{y.dtype}."
        )
    values = set(np.unique(y).tolist())
    if values <= {1, -1}:
        return y.astype(int)
    if values <= {0, 1}:
        raise ValueError(
            f"{name} holds 0/1 labels, which are ambiguous: skdfm follows "
            "scikit-learn's outlier convention, 1 = normal and -1 = anomalous. If 1 "
            "marks anomalies (anomalib, PyOD), pass np.where(y == 1, -1, 1); if 0 "
            "marks anomalies, pass np.where(y == 0, -1, 1)."
        )
    raise ValueError(
        f"{name} must hold only 1 (normal) and -1 (anomalous); found "
        f"{sorted(values)[:10]}."
    )


class OutlierLabelWarning(UserWarning):
    """``DFMDetector.fit``'s ``y`` changed what was fitted: rows labelled -1 (or
    with a defect in their mask) were left out, or 0/1 labels, ambiguous, were
    ignored."""


def normal_rows(y, n_samples: int, *, min_normal: int = 2):
    """The rows a detector fits on, from ``fit``'s ``y``: a boolean mask.

    The mask is None (fit on every row) unless ``y`` marks anomalous rows: outlier
    labels holding -1 (checked by :func:`check_outlier_labels`), or pixel masks
    of shape (n_samples, H, W) (anomalous: any nonzero pixel). A ``y`` without -1
    (scikit-learn's class labels or targets, as generic tools pass) is ignored as
    scikit-learn's outlier detectors ignore it; 0/1 labels with an
    :class:`OutlierLabelWarning`, since 1 means anomalous in anomalib and PyOD.
    Dropped rows are counted in an :class:`OutlierLabelWarning`; fewer than
    ``min_normal`` rows left raise a ValueError.
    """
    y = None if y is None else np.asarray(y)
    if y is None or y.dtype.kind not in "biuf" or y.size == 0:
        return None
    if y.ndim == 3:
        anomalous = y.reshape(len(y), -1).any(axis=1)
    elif (y == -1).any():
        anomalous = check_outlier_labels(y) == -1
    else:
        if 0 in y and set(np.unique(y).tolist()) <= {0, 1}:
            try:
                check_outlier_labels(y)
            except ValueError as labels_error:
                warnings.warn(
                    f"{labels_error} fit ignores this y and fits on every row.",
                    OutlierLabelWarning,
                    stacklevel=2,
                )
        return None
    if len(anomalous) != n_samples:
        raise ValueError(
            f"y has {len(anomalous)} labels or masks for {n_samples} rows of X."
        )
    n_dropped = int(anomalous.sum())
    if n_samples - n_dropped < min_normal:
        raise ValueError(
            f"y marks {n_dropped} of the {n_samples} rows anomalous: fitting "
            f"needs at least {min_normal} normal row(s), labelled 1, to fit on."
        )
    if n_dropped:
        warnings.warn(
            f"Left {n_dropped} of {n_samples} rows out of the fit: y marks them "
            "anomalous (-1, or a defect in their mask); the detector fits on "
            "normal rows only.",
            OutlierLabelWarning,
            stacklevel=2,
        )
    return ~anomalous


def check_labels_and_scores(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    """Labels checked by :func:`check_outlier_labels`; one finite score for each."""
    y_true = check_outlier_labels(y_true, name="y_true")
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.shape != y_true.shape:
        raise ValueError(
            f"y_score has shape {y_score.shape}, y_true {y_true.shape}; one score "
            "per sample is expected."
        )
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinity.")
    return y_true, y_score


def check_unchanged_since_fit(detector) -> None:
    """What was fitted is what scores: a ``score_type``, ``image_score`` or
    ``feature_shape`` set after ``fit`` raises ``NotFittedError`` saying so."""
    for name in ("score_type", "image_score"):
        now, fitted = getattr(detector, name), getattr(detector, name + "_")
        if now != fitted:
            raise NotFittedError(
                f"{name}={now!r} was set after this DFMDetector was fitted with "
                f"{name}={fitted!r} (its threshold offset_ is in those units): "
                f"fit it again, or set {name}={fitted!r} back."
            )
    shape = detector.feature_shape
    if shape is not None and (
        not isinstance(shape, (tuple, list)) or tuple(shape) != detector.feature_shape_
    ):
        raise NotFittedError(
            f"feature_shape={shape!r} was set after this DFMDetector was fitted "
            f"on a {detector.feature_shape_} grid: fit it again, or set "
            "feature_shape=None."
        )


def check_pixel_threshold(threshold, method) -> float:
    """A pixel threshold: a finite float >= 0, chosen by a named ``method``."""
    threshold = float(threshold)
    if not (np.isfinite(threshold) and threshold >= 0) or not isinstance(method, str):
        raise ValueError(
            "set_pixel_threshold needs a finite threshold >= 0 and a method; "
            f"got {threshold!r}, {method!r}."
        )
    return threshold
