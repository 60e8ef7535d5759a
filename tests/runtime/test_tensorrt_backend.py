"""TensorRT backend: the engine-cache key and its refusals, pure Python, run everywhere.
Building and running engines against ONNX Runtime: tests/export/test_tensorrt.py (GPU machines)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from leukoedge.backends import create_backend
from leukoedge.backends.tensorrt import EngineKey, check_engine, engine_paths, rebuild_command, write_sidecar
from leukoedge.errors import BackendUnavailableError

KEY = EngineKey("ab" * 32, "fp16", "10.3.0", "Orin", "8.7")


def _cached_engine(tmp_path: Path, key: EngineKey) -> tuple[Path, Path, Path]:
    model = tmp_path / "segmenter.onnx"
    model.write_bytes(b"onnx bytes")
    engine, sidecar = engine_paths(model, key.precision)
    engine.parent.mkdir()
    engine.write_bytes(b"serialized engine")
    write_sidecar(sidecar, key, model.name, {"batch_min": 1, "batch_opt": 1, "batch_max": 4})
    return model, engine, sidecar


def test_engines_are_cached_next_to_the_model_one_per_precision():
    bundle = Path("models/default")
    assert engine_paths(bundle / "segmenter.onnx", "fp16") == (bundle / "engines/segmenter.fp16.engine", bundle / "engines/segmenter.fp16.json")
    assert engine_paths(bundle / "segmenter.int8.onnx", "int8")[0] == bundle / "engines/segmenter.int8.engine"
    with pytest.raises(ValueError, match="precision"):
        engine_paths(bundle / "segmenter.onnx", "int4")


def test_an_engine_with_a_matching_key_is_accepted(tmp_path: Path):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))
    recorded = json.loads(sidecar.read_text())
    assert recorded["model_sha256"] == KEY.model_sha256 and recorded["profile"]["batch_max"] == 4


@pytest.mark.parametrize(
    "here, named",
    [
        (EngineKey("cd" * 32, "fp16", "10.3.0", "Orin", "8.7"), "model_sha256"),
        (EngineKey("ab" * 32, "fp16", "10.4.0", "Orin", "8.7"), "tensorrt_version"),
        (EngineKey("ab" * 32, "fp16", "10.3.0", "Xavier", "7.2"), "gpu_name"),
        (EngineKey("ab" * 32, "int8", "10.3.0", "Orin", "8.7"), "precision"),
    ],
)
def test_an_engine_built_for_another_model_tensorrt_or_gpu_is_refused_with_the_rebuild_command(tmp_path: Path, here: EngineKey, named: str):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    with pytest.raises(BackendUnavailableError, match="rebuild") as refusal:
        check_engine(engine, sidecar, here, rebuild_command(model, "fp16"))
    message = str(refusal.value)
    assert named in message and f"leukoedge export --engine --bundle {tmp_path} --fp16" in message


def test_a_missing_engine_or_an_unreadable_sidecar_is_refused(tmp_path: Path):
    model, engine, sidecar = _cached_engine(tmp_path, KEY)
    sidecar.write_text("{not json")
    with pytest.raises(BackendUnavailableError, match="unreadable"):
        check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))
    engine.unlink()
    with pytest.raises(BackendUnavailableError, match="no TensorRT engine segmenter.fp16.engine"):
        check_engine(engine, sidecar, KEY, rebuild_command(model, "fp16"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_the_backend_names_the_extra_to_install(tmp_path: Path):
    model = tmp_path / "segmenter.onnx"
    model.write_bytes(b"onnx bytes")
    with pytest.raises(BackendUnavailableError, match=r"leukoedge\[jetson\]"):
        create_backend("tensorrt", model, precision="fp16")


def test_export_without_engine_flag_or_without_tensorrt_exits_2_with_what_to_do(tiny_bundle: Path, capsys):
    from leukoedge import cli

    assert cli.main(["export", "--bundle", str(tiny_bundle)]) == 2
    assert "--engine" in capsys.readouterr().err
    if importlib.util.find_spec("tensorrt") is None:
        assert cli.main(["export", "--engine", "--bundle", str(tiny_bundle), "--fp16"]) == 2
        assert "leukoedge[jetson]" in capsys.readouterr().err


def test_every_model_a_bundle_can_hold_has_an_engine_batch_profile():
    from leukoedge.bundle import MODELS, OPTIONAL_MODELS
    from leukoedge.detector import MAX_CELL_BATCH
    from leukoedge.export.tensorrt import BATCH_PROFILES

    assert set(BATCH_PROFILES) == {*MODELS, *OPTIONAL_MODELS}
    for model in ("refiner", "classifier"):  # a frame's cells go in one call, up to Detector's batch
        low, typical, high = BATCH_PROFILES[model]
        assert low == 1 <= typical <= high == MAX_CELL_BATCH
