"""skdfm: Deep Feature Modeling (DFM) anomaly detection for scikit-learn."""

from ._detector import DFMDetector
from ._device import DeviceWarning
from ._persistence import SkdfmVersionWarning

__version__ = "0.1.0"

__all__ = ["DFMDetector", "DeviceWarning", "SkdfmVersionWarning", "__version__"]
