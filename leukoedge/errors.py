"""The one error hierarchy of leukoedge: every documented failure is a LeukoedgeError."""


class LeukoedgeError(Exception):
    """Base class of every error leukoedge raises on purpose."""


class InvalidFrameError(LeukoedgeError, ValueError):
    """A frame handed to Detector.run is not an HxWx3 uint8 image within the documented limits."""


class InvalidArgumentError(LeukoedgeError, ValueError):
    """An argument of Detector.load or Detector.run is not one it takes: an unknown channel order, precision or
    preprocessing, a negative thread count, a JPEG quality outside 1-100, a capture time that is not a finite ms >= 0."""


class LabelError(LeukoedgeError, ValueError):
    """A box file of a device's labelled frames (`leukoedge adapt --labels`) cannot be read as one of the formats it
    takes, or holds a box that cannot be right (outside the frame, of no size, of a class it does not know); the
    message names the file and the line or object."""


class BundleError(LeukoedgeError):
    """A model bundle is missing, malformed, of an unknown schema, or fails its checksums."""


class BackendUnavailableError(LeukoedgeError):
    """An inference backend (or its optional dependency) is not installed or cannot run here."""


class CaptureError(LeukoedgeError):
    """A frame source cannot be opened or stopped delivering frames."""


class UnreadableImageError(CaptureError):
    """An image file, or a recorded frame, was not decoded whole (empty, truncated, corrupt, not an
    image): its pixels are never judged."""


class UnsupportedImageError(UnreadableImageError):
    """An image file decoded whole but in a form leukoedge does not judge: greyscale, or more than 8 bits per channel.
    Converting it silently could only guess (a monochrome camera has no stain colours; 12-bit data in 16 bits darkens
    when shifted), so it is skipped and counted like an unreadable file, with its reason."""


class StorageError(LeukoedgeError, OSError):
    """A file leukoedge writes (a session record, an overlay, a summary) could not be written whole:
    a full disk, a read-only or vanished folder. What was written before it is intact."""
