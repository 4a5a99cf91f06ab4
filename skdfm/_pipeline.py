"""What counts as a DFM model: a fitted DFMDetector, alone or ending a Pipeline."""

from __future__ import annotations

from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._detector import DFMDetector
from ._device import resolve_device
from ._transformer import DeepFeatureTransformer

__all__ = ["move_model", "split_model"]


def split_model(model) -> tuple[DeepFeatureTransformer | None, DFMDetector]:
    """``(transformer, detector)`` of a fitted model; ``transformer`` is None for a
    bare detector. Raises a ValueError naming what is wrong otherwise."""
    if isinstance(model, DFMDetector):
        check_is_fitted(model)
        return None, model
    if not isinstance(model, Pipeline):
        raise ValueError(
            "model must be a fitted DFMDetector or a Pipeline of a "
            f"DeepFeatureTransformer and a DFMDetector, got {type(model).__name__}."
        )
    steps = [step for _, step in model.steps if step not in (None, "passthrough")]
    if (
        len(steps) != 2
        or not isinstance(steps[0], DeepFeatureTransformer)
        or not isinstance(steps[1], DFMDetector)
    ):
        names = [type(step).__name__ for step in steps]
        raise ValueError(
            "model must be a Pipeline of exactly a DeepFeatureTransformer and a "
            f"DFMDetector (steps in between would change the features), got {names}."
        )
    check_is_fitted(steps[0])
    check_is_fitted(steps[1])
    return steps[0], steps[1]


def move_model(model, device: str) -> None:
    """Run a fitted model on ``device`` from now on (in place): its parameters, its
    resolved ``device_`` and its backbone's weights all move."""
    transformer, detector = split_model(model)
    resolved = resolve_device(device)
    detector.set_params(device=device)
    detector.device_ = str(resolved)
    if transformer is not None:
        transformer.set_params(device=device)
        transformer.device_ = str(resolved)
        transformer.backbone_ = transformer._place(transformer.backbone_, resolved)
