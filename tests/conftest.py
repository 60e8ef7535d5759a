"""Shared fixtures: where the real blood-smear data lives."""

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable

import cv2
import pytest

from leukoedge import Detector

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data folder (../shared/data or $LEUKOEDGE_DATA); skips the test where it is absent."""
    root = Path(os.environ.get("LEUKOEDGE_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data folder not found at {root} (set LEUKOEDGE_DATA)")
    return root


@pytest.fixture(scope="session")
def script() -> Callable[[str], ModuleType]:
    """scripts/<name>.py imported as a module (the scripts are not a package): script("coarser_camera")."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_bundle(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle from the real pipeline in quick mode (a few steps), built once per test session.

    It checks the whole train -> export -> bundle path, not accuracy: its models are barely trained.
    """
    pytest.importorskip("torch", reason="building a bundle needs the training extra (torch)")
    from leukoedge.training.pipeline import PipelineConfig, run_pipeline

    bundle = run_pipeline(PipelineConfig(data_root, tmp_path_factory.mktemp("tiny") / "default", quick=True))
    return bundle.root


@pytest.fixture(scope="session")
def shared_detector(request: pytest.FixtureRequest) -> Detector:
    """One Detector for the whole session (tests may call it from several threads).

    It runs the bundle named by $LEUKOEDGE_BUNDLE when set (e.g. the shipped models/default, to test
    exactly what ships), else tiny_bundle.
    """
    chosen = os.environ.get("LEUKOEDGE_BUNDLE")
    return Detector.load(chosen if chosen else request.getfixturevalue("tiny_bundle"))


@pytest.fixture(scope="session")
def bundle_path(request: pytest.FixtureRequest) -> Path:
    """The bundle shared_detector runs, as a path for scripts run in a subprocess:
    $LEUKOEDGE_BUNDLE when set, else tiny_bundle."""
    chosen = os.environ.get("LEUKOEDGE_BUNDLE")
    return Path(chosen) if chosen else request.getfixturevalue("tiny_bundle")


SMEAR_FIELDS = 4


@pytest.fixture(scope="session")
def smear_fields(data_root: Path) -> list:
    """The first SMEAR_FIELDS real 640x480 BCCD fields (BGR uint8), touching cells among them."""
    paths = sorted((data_root / "bccd" / "images").glob("*.jpg"))[:SMEAR_FIELDS]
    if len(paths) < SMEAR_FIELDS:
        pytest.skip(f"needs {SMEAR_FIELDS} BCCD images in {data_root / 'bccd' / 'images'}")
    return [cv2.imread(str(path)) for path in paths]


SMEAR_VIDEO_FRAMES, SMEAR_VIDEO_SIZE = 6, (320, 240)  # width, height: small, so sessions over it stay fast


@pytest.fixture(scope="session")
def smear_video(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short MJPG .avi of real BCCD smear fields (SMEAR_VIDEO_FRAMES frames): a recording to run sessions over."""
    paths = sorted((data_root / "bccd" / "images").glob("*.jpg"))[:SMEAR_VIDEO_FRAMES]
    if len(paths) < SMEAR_VIDEO_FRAMES:
        pytest.skip(f"fewer than {SMEAR_VIDEO_FRAMES} BCCD images in {data_root / 'bccd' / 'images'}")
    video = tmp_path_factory.mktemp("video") / "smear.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, SMEAR_VIDEO_SIZE)
    for path in paths:
        writer.write(cv2.resize(cv2.imread(str(path)), SMEAR_VIDEO_SIZE, interpolation=cv2.INTER_AREA))
    writer.release()
    return video


@pytest.fixture(scope="session")
def calibrated_bundle(data_root: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bundle after `leukoedge calibrate` on a few real images, with gates that always pass
    (its barely trained models say nothing about INT8 accuracy): fp32 + int8 models, precisions section.
    It sits in <tmp>/calibrated/default, so its checkpoints are tiny_bundle's (pass --checkpoints)."""
    from leukoedge.calibration.calibrate import CalibrateConfig, calibrate_bundle

    out = tmp_path_factory.mktemp("calibrated") / "default"
    config = CalibrateConfig(
        data_root, tiny_bundle, out, fields=8, cells=8, candidates_per_class=4, gate_limit=4, dice_tolerance=1.0, accuracy_tolerance=1.0,
        benign_flag_tolerance=1.0, speed_runs=3
    )
    return calibrate_bundle(config).bundle.root
