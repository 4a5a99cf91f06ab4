"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn."""

from ._cache import FeatureCache
from ._datasets import load_mvtec, make_defect_images
from ._detector import DFMDetector
from ._device import DeviceWarning
from ._maps import AnomalyMaps, anomaly_maps
from ._metrics import aupro, check_outlier_labels, image_auroc, pixel_auroc
from ._model_selection import (
    InlierKFold,
    aupro_scorer,
    image_auroc_scorer,
    pixel_auroc_scorer,
)
from ._persistence import SkdfmVersionWarning
from ._plotting import anomaly_map_grid, overlay_anomaly_map, plot_anomaly_maps
from ._saving import ModelFileError, load, save
from ._streaming import stream_fit
from ._thresholds import calibrate_threshold, f1_adaptive_threshold, normalized_scores
from ._transformer import DeepFeatureTransformer

__version__ = "0.1.0"

__all__ = [
    "AnomalyMaps",
    "DFMDetector",
    "DeepFeatureTransformer",
    "DeviceWarning",
    "FeatureCache",
    "InlierKFold",
    "ModelFileError",
    "SkdfmVersionWarning",
    "__version__",
    "anomaly_map_grid",
    "anomaly_maps",
    "aupro",
    "aupro_scorer",
    "calibrate_threshold",
    "check_outlier_labels",
    "f1_adaptive_threshold",
    "image_auroc",
    "image_auroc_scorer",
    "load",
    "load_mvtec",
    "make_defect_images",
    "normalized_scores",
    "overlay_anomaly_map",
    "pixel_auroc",
    "pixel_auroc_scorer",
    "plot_anomaly_maps",
    "save",
    "stream_fit",
]
