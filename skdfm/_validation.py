"""Parameter checks scikit-learn's constraints do not make."""

from __future__ import annotations

import numpy as np
from sklearn.utils._param_validation import InvalidParameterError

__all__ = ["reject_bools"]


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
