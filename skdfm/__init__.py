"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn."""

from ._cache import FeatureCache
from ._datasets import load_mvtec, make_defect_images
from ._detector import DFMDetector
from ._device import DeviceWarning
from ._maps import AnomalyMaps, anomaly_maps
from ._metrics import aupro, check_outlier_labels, image_auroc, pixel_auroc
from ._persistence import SkdfmVersionWarning
from ._transformer import DeepFeatureTransformer

__version__ = "0.1.0"

__all__ = [
    "AnomalyMaps",
    "DFMDetector",
    "DeepFeatureTransformer",
    "DeviceWarning",
    "FeatureCache",
    "SkdfmVersionWarning",
    "__version__",
    "anomaly_maps",
    "aupro",
    "check_outlier_labels",
    "image_auroc",
    "load_mvtec",
    "make_defect_images",
    "pixel_auroc",
]
