"""Pickling contract shared by skdfm's estimators.

A pickle records the skdfm version that wrote it (scikit-learn's own check covers only
its modules) and, on load, re-resolves the fitted device so that a model fitted on a
GPU loads and computes on a machine without one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from .device import loadable_device

__all__ = ["PersistenceMixin", "SkdfmVersionWarning", "keep_state_on_error"]


@contextmanager
def keep_state_on_error(*estimators) -> Iterator[None]:
    """Undo everything the block did to the estimators' state if it raises.

    A fit that fails (bad data in batch 4 of a streaming fit, a decode error) leaves
    each estimator exactly as it was, previous fit included, instead of half-fitted.
    The state is kept by reference: fits replace fitted attributes, never change them
    in place.
    """
    saved = [(estimator, dict(vars(estimator))) for estimator in estimators]
    try:
        yield
    except BaseException:
        for estimator, state in saved:
            vars(estimator).clear()
            vars(estimator).update(state)
        raise


class SkdfmVersionWarning(UserWarning):
    """A model is loaded by a different skdfm version than the one that saved it."""


class PersistenceMixin:
    """Version stamp and device re-resolution for pickle, joblib and skops.

    Fitted state must be numpy or plain Python (never device tensors), so that the
    pickle is portable; ``device_`` is the only device-bound attribute. Device
    copies of fitted state (the detector's private ``_state``) are dropped by the
    estimator's ``__getstate__`` and rebuilt by its ``__setstate__``.
    """

    def __getstate__(self):
        from .. import __version__

        # object.__getstate__ returns the live __dict__: copy before stamping.
        return dict(super().__getstate__(), _skdfm_version=__version__)

    def __setstate__(self, state):
        from .. import __version__

        saved = state.pop("_skdfm_version", "unknown")
        if saved != __version__:
            warnings.warn(
                f"This {type(self).__name__} was saved with skdfm {saved} and is "
                f"loaded with skdfm {__version__}; results may differ. Refit it, or "
                "load it with the version that saved it.",
                SkdfmVersionWarning,
                stacklevel=2,
            )
        if "device_" in state:
            state["device_"] = loadable_device(state["device_"])
        super().__setstate__(state)
        self._check_state()

    def _check_state(self) -> None:
        """Raise a ValueError when the loaded parameters or fitted state are not
        ones this class could have made (a damaged or forged file)."""
        self._validate_params()
