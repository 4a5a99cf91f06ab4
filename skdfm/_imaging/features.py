"""Feature rows that know their grid: the (C, h, w) layout a row flattens.

A DFM feature row is a (channels, rows, columns) feature map flattened in C order.
The detector needs that layout for anything per location (anomaly maps, image scores
from the map's maximum), and inside a scikit-learn ``Pipeline`` it sees only what the
previous step returned. The layout therefore travels *with the data*, the way
scikit-learn passes column identity between steps:

* with ``set_output(transform="pandas")`` (or ``"polars"``) the columns are named by
  ``DeepFeatureTransformer.get_feature_names_out`` (``"<layer>_c<c>_y<y>_x<x>"``)
  and the detector reads the grid from ``feature_names_in_``;
* with the default numpy output, :func:`with_feature_shape` returns the rows as a
  :class:`FeatureRows` view: an ``ndarray`` in every respect (``check_array`` turns
  it into a plain one), plus a ``feature_shape`` attribute. Torch output carries
  the same attribute on the tensor.

Only what keeps every column where it was keeps the grid: a subset of rows, a copy,
a change of dtype. Anything else (column indexing, arithmetic, matrix products,
reductions, concatenation, a new tensor) gives a plain array without it, so a
stale layout is never used; :func:`feature_shape_of` also ignores one whose size
does not match the rows' width.
"""

from __future__ import annotations

import re
from numbers import Integral

import numpy as np

__all__ = [
    "FeatureRows",
    "agreed_feature_shape",
    "check_feature_shape",
    "check_same_feature_shape",
    "feature_shape_of",
    "feature_shape_to_map",
    "with_feature_shape",
]

_NAME = re.compile(r"^.+_c\d+_y(\d+)_x(\d+)$")


class FeatureRows(np.ndarray):
    """A 2-D float array of feature rows with the ``(C, h, w)`` grid they flatten."""

    feature_shape: tuple[int, int, int] | None = None

    def __array_finalize__(self, obj):
        self.feature_shape = None  # kept only where columns provably stay put

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(out, FeatureRows) and _selects_rows(key):
            out.feature_shape = self.feature_shape
        return out

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # Arithmetic, products and reductions give plain arrays: their columns
        # need not be the grid's any more.
        inputs = tuple(_plain(x) for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def copy(self, order="C"):
        out = super().copy(order)
        out.feature_shape = self.feature_shape
        return out

    def astype(self, dtype, *args, **kwargs):
        out = super().astype(dtype, *args, **kwargs)
        if isinstance(out, FeatureRows):
            out.feature_shape = self.feature_shape
        return out

    def __reduce__(self):
        constructor, args, state = super().__reduce__()
        return constructor, args, (state, self.feature_shape)

    def __setstate__(self, state):
        array_state, self.feature_shape = state
        super().__setstate__(array_state)


def _plain(x):
    return x.view(np.ndarray) if isinstance(x, FeatureRows) else x


def _selects_rows(key) -> bool:
    """Whether ``X[key]`` picks rows and keeps every column in place."""
    if isinstance(key, tuple):
        if len(key) == 2 and isinstance(key[1], slice) and key[1] == slice(None):
            key = key[0]
        elif len(key) == 1:
            key = key[0]
        else:
            return False
    if key is None or key is Ellipsis or isinstance(key, tuple):
        return False
    return True  # an int, a slice, a mask or indices along the rows


def check_feature_shape(feature_shape, n_features: int | None = None):
    """``feature_shape`` as a tuple of 3 positive ints, or a ValueError naming it.

    With ``n_features``, its product must equal it.
    """
    if not (
        isinstance(feature_shape, (tuple, list))
        and len(feature_shape) == 3
        and all(
            isinstance(s, Integral) and not isinstance(s, bool) and s >= 1
            for s in feature_shape
        )
    ):
        raise ValueError(
            f"feature_shape={feature_shape!r} must be (channels, rows, columns), "
            "three positive ints."
        )
    shape = tuple(int(s) for s in feature_shape)
    if n_features is not None and int(np.prod(shape)) != n_features:
        raise ValueError(
            f"feature_shape={shape} has {int(np.prod(shape))} entries but the rows "
            f"have {n_features} features; it must be (channels, rows, columns) of "
            "the feature map each row flattens."
        )
    return shape


def with_feature_shape(X, feature_shape: tuple[int, int, int]):
    """``X`` (numpy rows or a torch tensor) marked with the grid its rows flatten."""
    if isinstance(X, np.ndarray):
        X = X.view(FeatureRows)
    X.feature_shape = tuple(feature_shape)
    return X


def _shape_from_names(names, n_features: int):
    """(C, h, w) from ``"<prefix>_c<c>_y<y>_x<x>"`` column names in C order."""
    if names is None or len(names) != n_features or n_features == 0:
        return None
    last = _NAME.match(str(names[-1]))
    if last is None:
        return None
    rows, cols = int(last.group(1)) + 1, int(last.group(2)) + 1
    if n_features % (rows * cols):
        return None
    parsed = [_NAME.match(str(name)) for name in names]
    if any(match is None for match in parsed):
        return None
    y = np.fromiter((int(m.group(1)) for m in parsed), np.int64, n_features)
    x = np.fromiter((int(m.group(2)) for m in parsed), np.int64, n_features)
    index = np.arange(n_features)
    if not (
        np.array_equal(x, index % cols) and np.array_equal(y, index // cols % rows)
    ):
        return None
    return (n_features // (rows * cols), rows, cols)


def feature_shape_of(X, n_features: int, feature_names=None):
    """The ``(C, h, w)`` grid ``X``'s rows flatten, or None when not known.

    Parameters
    ----------
    X : array-like, tensor or DataFrame
        Rows as given to the detector (before validation strips any attribute).
    n_features : int
        Width of the rows; a layout whose product differs is ignored.
    feature_names : array-like of str, default=None
        Column names (``feature_names_in_``), read when ``X`` has no attribute.
    """
    shape = getattr(X, "feature_shape", None)
    if shape is not None:
        try:
            return check_feature_shape(shape, n_features)
        except ValueError:
            return None
    return _shape_from_names(feature_names, n_features)


def agreed_feature_shape(carried, feature_shape, n_features: int):
    """The grid a detector is fitted on: its ``feature_shape`` parameter, which
    must agree with the one the rows say (``carried``, or None), else ``carried``
    (both checked)."""
    if carried is not None:
        carried = check_feature_shape(carried, n_features)
    if feature_shape is None:
        return carried
    shape = check_feature_shape(feature_shape, n_features)
    if carried is not None and carried != shape:
        raise ValueError(
            f"feature_shape={shape} but X says its rows flatten a {carried} "
            "grid; drop feature_shape (X knows its grid) or fix it."
        )
    return shape


def check_same_feature_shape(X, fitted) -> None:
    """Refuse rows that say they flatten another grid than the ``fitted`` one (the
    layer or pooling of the features changed since fit)."""
    if fitted is None:
        return
    shape = feature_shape_of(X, int(np.prod(fitted)))
    if shape is not None and shape != fitted:
        raise ValueError(
            f"X flattens a {shape} feature grid but this DFMDetector was fitted "
            f"on a {fitted} grid: the features changed (layer or pooling); fit "
            "the detector again."
        )


def feature_shape_to_map(feature_shape, fitted, n_features: int):
    """The grid residual maps are laid out on: ``feature_shape`` (checked; it may
    not differ from the ``fitted`` one), else the ``fitted`` one."""
    if feature_shape is None:
        if fitted is None:
            raise ValueError(
                "This DFMDetector does not know the grid its rows flatten: pass "
                "feature_shape=(channels, rows, columns)."
            )
        return fitted
    feature_shape = check_feature_shape(feature_shape, n_features)
    if fitted is not None and feature_shape != fitted:
        raise ValueError(
            f"feature_shape={feature_shape} differs from the grid this "
            f"DFMDetector was fitted on, {fitted}."
        )
    return feature_shape
