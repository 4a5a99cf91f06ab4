"""Parameter checks scikit-learn's constraints do not make."""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError

__all__ = ["check_contamination", "check_magnitude", "reject_bools"]


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
