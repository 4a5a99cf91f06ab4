"""What a DFM model is: a DFMDetector, alone or after a DeepFeatureTransformer.

Every function that takes "a model" (maps, thresholds, streaming fit, the command)
asks this module for its parts, so the rule, and its error messages, live here.
"""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from .._detector import DFMDetector
from .._transformer import DeepFeatureTransformer

__all__ = ["move_model", "split_model"]


def split_model(
    model, *, fitted: bool = True
) -> tuple[DeepFeatureTransformer | None, DFMDetector]:
    """``(transformer, detector)`` of a DFM model; ``transformer`` is None for a
    bare detector.

    Parameters
    ----------
    model : DFMDetector or Pipeline
        A ``DFMDetector`` or a ``Pipeline`` of exactly a ``DeepFeatureTransformer``
        and a ``DFMDetector`` (``None`` / ``"passthrough"`` steps are ignored).
    fitted : bool, default=True
        Also require the parts to be fitted (``NotFittedError`` otherwise).

    Raises
    ------
    ValueError
        Naming what is wrong, for anything else.
    """
    if isinstance(model, DFMDetector):
        parts = (None, model)
    elif not isinstance(model, Pipeline):
        raise ValueError(
            "model must be a DFMDetector or a Pipeline of a DeepFeatureTransformer "
            f"and a DFMDetector, got {type(model).__name__}."
        )
    else:
        steps = [step for _, step in model.steps if step not in (None, "passthrough")]
        if (
            len(steps) != 2
            or not isinstance(steps[0], DeepFeatureTransformer)
            or not isinstance(steps[1], DFMDetector)
        ):
            names = [type(step).__name__ for step in steps]
            raise ValueError(
                "model must be a Pipeline of exactly a DeepFeatureTransformer and a "
                "DFMDetector (other steps would change the features, or be fitted "
                f"on part of the data only), got {names}."
            )
        parts = (steps[0], steps[1])
    if fitted:
        for part in parts:
            if part is not None:
                check_is_fitted(part)
    return parts


def move_model(model, device) -> None:
    """Run a fitted model on ``device`` from now on (in place): the parameters, the
    resolved ``device_`` and the fitted tensors of each part move."""
    for part in split_model(model):
        if part is not None:
            part.to_device(device)
