"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn.

``import skdfm`` is cheap: the estimators (torch, timm, scikit-learn) are imported
when first used, so a process that only runs an exported model
(:class:`skdfm.ExportedModel`) never loads them.
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

#: Public name -> the private module that defines it (imported on first access).
_LAZY = {
    "AnomalyMaps": "._results",
    "DFMDetector": "._detector",
    "DeepFeatureTransformer": "._transformer",
    "DeviceWarning": "._device",
    "ExportedModel": "._runtime",
    "FeatureCache": "._cache",
    "InlierKFold": "._model_selection",
    "ModelFileError": "._saving",
    "SkdfmVersionWarning": "._persistence",
    "anomaly_map_grid": "._plotting",
    "anomaly_maps": "._maps",
    "aupro": "._metrics",
    "aupro_scorer": "._model_selection",
    "calibrate_pixel_threshold": "._thresholds",
    "calibrate_threshold": "._thresholds",
    "check_outlier_labels": "._metrics",
    "export": "._export",
    "f1_adaptive_threshold": "._thresholds",
    "image_auroc": "._metrics",
    "image_auroc_scorer": "._model_selection",
    "load": "._saving",
    "load_mvtec": "._datasets",
    "make_defect_images": "._datasets",
    "normalized_scores": "._thresholds",
    "overlay_anomaly_map": "._plotting",
    "pixel_auroc": "._metrics",
    "pixel_auroc_scorer": "._model_selection",
    "plot_anomaly_maps": "._plotting",
    "save": "._saving",
    "stream_fit": "._streaming",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name):  # PEP 562: import the defining module on first access
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'skdfm' has no attribute {name!r}") from None
    value = getattr(_import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(
        {*(n for n in globals() if not n.startswith("_")), *_LAZY, "__version__"}
    )
