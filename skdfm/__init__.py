"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn.

``import skdfm`` is cheap: the estimators (torch, timm, scikit-learn) are imported
when first used, so a process that only runs an exported model
(:class:`skdfm.ExportedModel`) never loads them.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

#: Public name -> the private module that defines it (imported on first access).
_LAZY = {
    "AnomalyMaps": "._deploy.results",
    "DFMDetector": "._detector",
    "DeepFeatureTransformer": "._transformer",
    "DeviceWarning": "._core.device",
    "ExportedModel": "._deploy.runtime",
    "FeatureCache": "._cache",
    "InlierKFold": "._evaluation.model_selection",
    "ModelFileError": "._core.files",
    "OutlierLabelWarning": "._core.validation",
    "SkdfmVersionWarning": "._core.persistence",
    "anomaly_map_grid": "._evaluation.plotting",
    "anomaly_maps": "._tools.maps",
    "aupro": "._evaluation.metrics",
    "aupro_scorer": "._evaluation.model_selection",
    "calibrate_pixel_threshold": "._tools.thresholds",
    "calibrate_threshold": "._tools.thresholds",
    "check_outlier_labels": "._core.validation",
    "export": "._tools.export",
    "f1_adaptive_threshold": "._tools.thresholds",
    "image_auroc": "._evaluation.metrics",
    "image_auroc_scorer": "._evaluation.model_selection",
    "load": "._tools.saving",
    "load_mvtec": "._evaluation.datasets",
    "make_defect_images": "._evaluation.datasets",
    "normalized_scores": "._tools.thresholds",
    "offline_weights": "._imaging.weights",
    "overlay_anomaly_map": "._evaluation.plotting",
    "pixel_auroc": "._evaluation.metrics",
    "pixel_auroc_scorer": "._evaluation.model_selection",
    "plot_anomaly_maps": "._evaluation.plotting",
    "recommended_model": "._tools.recommended",
    "save": "._tools.saving",
    "stream_fit": "._tools.streaming",
    "training_images": "._evaluation.datasets",
    "validation_images": "._evaluation.datasets",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name):  # PEP 562: import the defining module on first access
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'skdfm' has no attribute {name!r}") from None
    try:
        value = getattr(_import_module(module, __name__), name)
    except ModuleNotFoundError as error:  # skdfm-runtime, or --no-deps
        from ._deploy.runtime import needs_full_install

        clear = needs_full_install(f"skdfm.{name}", error)
        if clear is None:
            raise
        raise clear from error
    globals()[name] = value
    return value


def __dir__():
    return sorted(
        {*(n for n in globals() if not n.startswith("_")), *_LAZY, "__version__"}
    )
