"""leukoedge: white blood cell detection, segmentation and leukemia screening for microscope cameras.

The runtime needs only numpy, OpenCV and ONNX Runtime; torch is never imported here.
"""

from .detector import Detector
from .errors import BackendUnavailableError, BundleError, CaptureError, InvalidFrameError, LeukoedgeError
from .result import Cell, Result

__all__ = [
    "Detector",
    "Result",
    "Cell",
    "LeukoedgeError",
    "InvalidFrameError",
    "BundleError",
    "BackendUnavailableError",
    "CaptureError",
]
__version__ = "0.1.0"
