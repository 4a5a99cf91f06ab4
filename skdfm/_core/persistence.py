"""Pickling contract shared by skdfm's estimators.

A pickle records the skdfm version that wrote it (scikit-learn's own check covers only
its modules) and, on load, re-resolves the fitted device so that a model fitted on a
GPU loads and computes on a machine without one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from .device import loadable_device

__all__ = [
    "OPTIONAL",
    "REQUIRED",
    "FittedAttribute",
    "PersistenceMixin",
    "SkdfmVersionWarning",
    "add_defaults",
    "check_fitted",
    "keep_state_on_error",
    "names_set_by",
]

#: ``FittedAttribute.default`` of an attribute every pickle that holds its group
#: holds (loading refuses one without it) ...
REQUIRED = object()
#: ... and of one that may be absent whatever its group (``feature_names_in_``).
OPTIONAL = object()


class FittedAttribute(NamedTuple):
    """One row of an estimator's table of fitted attributes.

    The table is the one list of them: the pickle checks, the ``.skdfm``
    allow-list and the estimator's own groups (what a new streaming batch drops,
    ...) read it, and a test holds it equal to the docstring's Attributes section.
    """

    name: str
    #: What sets it, a group name of the estimator's (e.g. ``"components"``).
    set_by: str
    #: How loading checks it (``check(name, value, sizes) -> value``, from
    #: :mod:`~skdfm._core.validation`), or None: not checked alone.
    check: Callable[[str, Any, dict], Any] | None = None
    #: Given to pickles saved before it existed that hold the rest of its group: a
    #: value, or a function of the pickled state; or REQUIRED, or OPTIONAL.
    default: Any = REQUIRED


def names_set_by(table, *groups: str) -> tuple[str, ...]:
    """The names of ``table``'s attributes set by any of ``groups``."""
    return tuple(row.name for row in table if row.set_by in groups)


def add_defaults(table, state: dict) -> None:
    """Give an old pickle's ``state`` (in place) the attributes it predates: each
    one with a default whose group the pickle holds."""
    held = {row.set_by for row in table if row.name in state}
    for row in table:
        default = row.default
        if default is not REQUIRED and default is not OPTIONAL and row.set_by in held:
            state.setdefault(row.name, default(state) if callable(default) else default)


def check_fitted(table, fitted: dict, sizes: dict) -> None:
    """Refuse a REQUIRED attribute missing from its group; run each present
    attribute's check and store what it returns (a list read from a file becomes
    the tuple it was)."""
    held = {row.set_by for row in table if row.name in fitted}
    for row in table:
        if row.name not in fitted:
            if row.default is REQUIRED and row.set_by in held:
                raise ValueError(f"{row.name} is missing.")
        elif row.check is not None:
            fitted[row.name] = row.check(row.name, fitted[row.name], sizes)


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
    copies of fitted state (the detector's private ``_scoring``) are dropped by the
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
