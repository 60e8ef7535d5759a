"""leukoedge: white blood cell detection, segmentation and leukemia screening for microscope cameras.

The runtime needs only numpy, OpenCV and ONNX Runtime; torch is never imported here.
"""

from .capture import Frame, ThreadedReader, open_source
from .detector import Detector
from .errors import BackendUnavailableError, BundleError, CaptureError, InvalidArgumentError, InvalidFrameError, LeukoedgeError, StorageError
from .result import Cell, Result, Verdict, draw_overlay
from .shipped import default_bundle

__all__ = [
    "Detector",
    "Result",
    "Cell",
    "Verdict",
    "draw_overlay",
    "open_source",
    "ThreadedReader",
    "Frame",
    "default_bundle",
    "LeukoedgeError",
    "InvalidFrameError",
    "InvalidArgumentError",
    "BundleError",
    "BackendUnavailableError",
    "CaptureError",
    "StorageError",
]
__version__ = "0.1.0"
