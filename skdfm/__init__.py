"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn."""

from ._detector import DFMDetector
from ._device import DeviceWarning
from ._persistence import SkdfmVersionWarning
from ._transformer import DeepFeatureTransformer

__version__ = "0.1.0"

__all__ = [
    "DFMDetector",
    "DeepFeatureTransformer",
    "DeviceWarning",
    "SkdfmVersionWarning",
    "__version__",
]
