"""Where the files shipped with a leukoedge checkout are: the default model bundle and the models folder.

Integrators, the examples and the command line find the bundle here, so none of them imports another's code.
"""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def default_bundle() -> Path:
    """$LEUKOEDGE_BUNDLE, else the bundle shipped in the repository (models/default)."""
    return Path(os.environ.get("LEUKOEDGE_BUNDLE", MODELS_DIR / "default"))
