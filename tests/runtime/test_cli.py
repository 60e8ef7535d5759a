"""The command line: info, run on an image, a folder (with a corrupt file) and a video, bench, and errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from leukoedge import benchmark, cli, session
from leukoedge.errors import LeukoedgeError
from leukoedge.result import Timings
from leukoedge.shipped import default_bundle
from leukoedge.training.cli import parse_box_jitter, parse_source_weights

STAGES = tuple(Timings(capture_ms=0.0).as_dict())  # what Detector.run times, capture included: leukoedge read the frame


@pytest.fixture(scope="module")
def bccd_image(data_root: Path) -> Path:
    return data_root / "bccd" / "images" / "BloodImage_00000.jpg"


def test_info_prints_the_bundle_name_and_its_files(tiny_bundle, capsys):
    assert cli.main(["info", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "leukoedge-default" in out
    assert re.search(r"segmenter\.onnx .* sha256 [0-9a-f]{12}", out)
    assert re.search(r"classifier\.onnx .* sha256 [0-9a-f]{12}", out)


def test_info_on_a_missing_bundle_exits_2_with_a_message(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "no-bundle")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_on_an_image_writes_overlay_and_json_and_prints_timings(tiny_bundle, bccd_image, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert cli.main(["run", str(bccd_image), "--bundle", str(tiny_bundle), "--out", str(out_dir)]) == 0

    overlay = cv2.imread(str(out_dir / "BloodImage_00000_overlay.png"), cv2.IMREAD_COLOR)
    assert overlay is not None and overlay.shape == (480, 640, 3)
    record = json.loads((out_dir / "BloodImage_00000.json").read_text())
    assert isinstance(record["cells"], list)
    assert record["verdict"]["cell_count"] == len(record["cells"])
    assert set(record["timings"]) == set(STAGES)
    out = capsys.readouterr().out
    assert "BloodImage_00000.jpg:" in out
    timings_line = next(line for line in out.splitlines() if "timings ms:" in line)
    for stage in STAGES:
        assert re.search(rf"{stage} \d+\.\d", timings_line), timings_line


def test_run_on_a_folder_with_a_corrupt_image_processes_the_rest_and_exits_1(tiny_bundle, bccd_image, tmp_path):
    # A subprocess: the error goes through logging, which pytest captures in-process.
    images = tmp_path / "images"
    images.mkdir()
    shutil.copyfile(bccd_image, images / "a_good.jpg")
    (images / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    shutil.copyfile(bccd_image, images / "c_good.jpg")
    out_dir = tmp_path / "out"

    completed = subprocess.run(
        [sys.executable, "-m", "leukoedge.cli", "run", str(images), "--bundle", str(tiny_bundle), "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 1, completed.stderr
    assert "b_corrupt.jpg" in completed.stderr and "cannot read" in completed.stderr  # never judged
    assert sorted(path.name for path in out_dir.iterdir()) == ["a_good.json", "a_good_overlay.png", "c_good.json", "c_good_overlay.png"]
    assert "a_good.jpg:" in completed.stdout and "c_good.jpg:" in completed.stdout


def test_run_on_files_sharing_a_stem_writes_each_one_s_results(tiny_bundle, bccd_image, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    frame = cv2.imread(str(bccd_image))
    for name in ("cell.jpg", "cell.png", "cell_png.bmp"):  # the third would take the second's fallback name
        cv2.imwrite(str(images / name), frame)
    out_dir = tmp_path / "out"
    assert cli.main(["run", str(images), "--bundle", str(tiny_bundle), "--out", str(out_dir)]) in (0, 1)
    written = sorted(path.name for path in out_dir.iterdir() if path.suffix == ".json")
    assert len(written) == 3, written  # before, cell.png's results overwrote cell.jpg's
    assert cli.output_stem("cell.png", {"cell"}) == "cell_png"
    assert cli.output_stem("cell.png", {"cell", "cell_png"}) == "cell_png_2"
    assert cli.output_stem("cell.png", set()) == "cell"


def test_run_refuses_a_file_compressed_harder_than_the_bundle_validated(bccd_image, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    field = cv2.imread(str(bccd_image))
    cv2.imwrite(str(images / "saved_at_40.jpg"), field, [cv2.IMWRITE_JPEG_QUALITY, 40])
    cv2.imwrite(str(images / "lossless.png"), field)
    out_dir = tmp_path / "out"
    assert cli.main(["run", str(images), "--out", str(out_dir)]) == 0
    compressed = json.loads((out_dir / "saved_at_40.json").read_text())["verdict"]
    assert compressed["status"] == "outside_domain" and "JPEG quality 40" in compressed["reason"] and not compressed["flagged"]
    assert json.loads((out_dir / "lossless.json").read_text())["verdict"]["status"] == "ok"


def test_run_on_a_missing_input_exits_2_with_a_message(tiny_bundle, tmp_path, capsys):
    missing = tmp_path / "no-such-image.jpg"
    assert cli.main(["run", str(missing), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(missing) in err


def test_bench_prints_median_and_p95_per_stage(tiny_bundle, bccd_image, capsys):
    assert cli.main(["bench", str(bccd_image), "--bundle", str(tiny_bundle), "--frames", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"backend onnxruntime \(segmenter \w+, refiner \w+, classifier \w+\), preprocess cpu$", out, re.MULTILINE)
    assert re.search(r"stage\s+median ms\s+p95 ms", out)
    for stage in benchmark.STAGES:
        row = re.search(rf"^{stage}\s+(\d+\.\d)\s+(\d+\.\d)$", out, re.MULTILINE)
        assert row, f"no {stage} row in:\n{out}"
        assert float(row.group(1)) <= float(row.group(2)) + 0.1  # median <= p95, up to the printed rounding
    assert re.search(r"frames/s \(median total\): \d+\.\d", out)


def test_bench_times_only_frames_the_bundle_judges(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    sample = Path(__file__).resolve().parents[2] / "samples" / "bccd_BloodImage_00002.jpg"
    cv2.imwrite(str(images / "tiny.png"), cv2.imread(str(sample))[:32, :32])  # returns before any model
    assert cli.main(["bench", str(images / "tiny.png"), "--frames", "1", "--warmup", "0"]) == 2
    captured = capsys.readouterr()
    assert "not timed: tiny.png (32x32) is too small to judge" in captured.out and "nothing to time" in captured.err
    shutil.copy(sample, images / "field.jpg")
    assert cli.main(["bench", str(images), "--frames", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "not timed: tiny.png" in out and "Detector.run on 1 real frame(s) (640x480)" in out


@pytest.mark.parametrize("command", ["run", "bench"])
def test_cuda_preprocessing_without_pycuda_exits_2_with_the_install_hint(command, bccd_image, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # as if it were not installed, on any machine
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    extra = ["--out", str(tmp_path / "out")] if command == "run" else ["--frames", "1", "--warmup", "0"]
    assert cli.main([command, str(bccd_image), "--bundle", str(default_bundle()), "--preprocess", "cuda", *extra]) == 2
    assert "error: the TensorRT backend and CUDA preprocessing need pycuda: pip install 'leukoedge[jetson]'" in capsys.readouterr().err


def test_bench_on_onnxruntime_cuda_without_the_cuda_provider_exits_2_naming_onnxruntime_gpu(bccd_image, monkeypatch, capsys):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert cli.main(["bench", str(bccd_image), "--bundle", str(default_bundle()), "--backend", "onnxruntime-cuda", "--frames", "1"]) == 2
    assert "onnxruntime-cuda backend needs onnxruntime-gpu" in capsys.readouterr().err


def test_source_weights_parse_and_a_bad_one_names_its_option():
    assert parse_source_weights("wbc-seg-zheng=4, all-idb2=2") == {"wbc-seg-zheng": 4.0, "all-idb2": 2.0}
    assert parse_source_weights(None) == {}
    with pytest.raises(LeukoedgeError, match="--refiner-source-weights takes SOURCE=WEIGHT"):
        parse_source_weights("wbc-seg-zheng", "--refiner-source-weights")


def test_box_jitter_parses_two_shares_and_refuses_others():
    assert parse_box_jitter("0.1,0.2") == (0.1, 0.2)
    for bad in ("0.1", "a,b", "0.1,0.9"):
        with pytest.raises(LeukoedgeError, match="--classifier-box-jitter"):
            parse_box_jitter(bad)


def test_train_refuses_a_classifier_without_the_only_sources_of_a_head_before_training(tmp_path, capsys):
    pytest.importorskip("torch", reason="train needs the training extra (torch)")
    code = cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--classification-sources", "all-idb2,pbc"])
    assert code == 2
    assert re.search(r"classification_sources must be some of all-idb2, all-taleqani, pbc\b.*, with all-taleqani and pbc", capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


def test_train_refuses_an_unknown_refiner_architecture(tmp_path, capsys):
    pytest.importorskip("torch", reason="train needs the training extra (torch)")
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--refiner-model", "hctnet_xl"]) == 2
    assert "unknown segmenter 'hctnet_xl'; choose one of" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_has_gone_ends_quietly(tiny_bundle):
    # `leukoedge info B | head -1`: once head has exited, every write fails; no traceback may follow.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    command = [sys.executable, "-c", "import sys; from leukoedge.cli import main; sys.exit(main(sys.argv[1:]))", "info", str(tiny_bundle)]
    try:
        writer = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert writer.returncode == 1
    assert "Traceback" not in writer.stderr and "BrokenPipeError" not in writer.stderr


# --- arguments and failures: a message and exit 2, never a traceback --------------------------------


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "train", "study", "pretrain"])
def test_a_missing_data_folder_is_named_and_no_out_folder_is_left(command, tmp_path, capsys):
    missing, out = tmp_path / "no-data", tmp_path / "out"
    assert cli.main([command, "--data", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: --data {missing} is not a folder" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "arguments",
    [
        ["run", "--source", "0", "--save-every", "0"],
        ["run", "--source", "0", "--frames", "-1"],
        ["run", "--source", "0", "--frames", "0"],
        ["bench", "samples", "--frames", "0"],
        ["bench", "samples", "--warmup", "-1"],
        ["soak", "samples", "--frames", "0"],
    ],
    ids=["save-every-0", "frames-minus-1", "frames-0", "bench-frames-0", "bench-warmup-minus-1", "soak-frames-0"],
)
def test_a_count_out_of_range_is_refused_before_anything_runs(arguments, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(arguments)
    assert exited.value.code == 2
    assert re.search(r"expected a whole number >= [01], got -?\d+", capsys.readouterr().err)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["adapt", "--frames", "samples", "--out", "adapted", "--hold-back", "0"], "expected a share from 0.05 to 0.5, got 0"),
        (["adapt", "--frames", "samples", "--out", "adapted", "--hold-back", "nan"], "expected a share from 0.05 to 0.5, got nan"),
        (["soak", "samples", "--max-growth-mb", "nan"], "expected a number above 0, got nan"),  # passed every run before
        (["soak", "samples", "--max-growth-mb", "-1"], "expected a number above 0, got -1"),
    ],
    ids=["hold-back-0", "hold-back-nan", "growth-nan", "growth-minus-1"],
)
def test_a_share_or_bound_out_of_range_is_a_usage_error_not_a_traceback(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(arguments)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["images", "live", "evaluate"])
def test_out_pointing_at_a_file_is_refused(mode, bundle_path, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    arguments = {
        "images": ["run", "samples", "--bundle", str(bundle_path)],
        "live": ["run", "--source", "samples", "--bundle", str(bundle_path)],
        "evaluate": ["evaluate", "--data", str(tmp_path)],
    }[mode]
    assert cli.main([*arguments, "--out", str(out)]) == 2
    assert f"error: --out {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_a_source_that_cannot_be_opened_claims_no_session(bundle_path, tmp_path, capsys):
    out = tmp_path / "session"
    assert cli.main(["run", "--source", str(tmp_path / "missing.avi"), "--bundle", str(bundle_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "written to" not in err
    assert not out.exists()


def test_a_folder_holding_an_older_session_is_refused_and_not_claimed(bundle_path, tmp_path, capsys):
    out = tmp_path / "session"
    out.mkdir()
    for name in ("results.jsonl", "summary.json"):
        (out / name).write_text("an older session\n")
    assert cli.main(["run", "--source", "samples", "--bundle", str(bundle_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a session" in err and "written to" not in err
    assert (out / "summary.json").read_text() == "an older session\n"


def test_run_on_images_with_a_full_disk_exits_2_and_claims_nothing(bundle_path, bccd_image, tmp_path, monkeypatch, capsys):
    def full_disk(path, mode="r", *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(session.files, "open", full_disk, raising=False)
    out = tmp_path / "out"
    assert cli.main(["run", str(bccd_image), "--bundle", str(bundle_path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "written to" not in captured.out
    assert f"cannot write {out / 'BloodImage_00000_overlay.png'}: No space left on device" in captured.err
    assert "the results of the 0 frame(s) before BloodImage_00000.jpg" in captured.err
    assert list(out.iterdir()) == []


# --- one input path, one output layout --------------------------------------------------------------


def test_run_on_a_video_writes_the_same_layout_named_by_frame(bundle_path, smear_video, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", str(smear_video), "--bundle", str(bundle_path), "--out", str(out), "--save-every", "2", "--frames", "5"]) == 0
    kept = ["frame_000000", "frame_000002", "frame_000004"]
    assert sorted(path.name for path in out.iterdir()) == sorted([f"{name}.json" for name in kept] + [f"{name}_overlay.png" for name in kept])
    record = json.loads((out / "frame_000002.json").read_text())
    assert record["frame_shape"] == [240, 320] and "status" in record["verdict"]
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("frame_")] == [f"frame_{index:06d}" for index in range(5)]
    assert f"overlays and JSON of 3 frame(s) written to {out}" in printed


def test_run_prints_the_status_of_a_frame_it_did_not_judge(bundle_path, tmp_path, capsys):
    small = tmp_path / "small.png"  # within the frame limits, too small to hold a white cell at the bundle's scale
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(Path(cli.__file__).parents[1] / "samples" / "bccd_BloodImage_00002.jpg")), (40, 30)))
    assert cli.main(["run", str(small), "--bundle", str(bundle_path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^small\.png: NOT JUDGED \(too_small\): \S", printed, re.MULTILINE)
    assert re.search(r"^0 frame\(s\) judged, 0 flagged; 1 not judged \(too_small 1\)$", printed, re.MULTILINE)
    assert json.loads((tmp_path / "out" / "small.json").read_text())["verdict"]["status"] == "too_small"


def test_run_hands_every_detector_option_to_detector_load(monkeypatch, tmp_path, capsys):
    from leukoedge.detector import Detector

    received = {}

    def load(bundle, **options):
        received.update(options, bundle=bundle)
        raise LeukoedgeError("stop here")

    monkeypatch.setattr(Detector, "load", staticmethod(load))
    arguments = ["run", "samples", "--out", str(tmp_path / "out"), "--bundle", "b", "--precision", "fp32", "--threads", "2"]
    assert cli.main([*arguments, "--channel-order", "RGB", "--backend", "onnxruntime", "--preprocess", "cpu"]) == 2
    assert received == {"bundle": Path("b"), "backend": "onnxruntime", "threads": 2, "precision": "fp32", "preprocess": "cpu", "channel_order": "RGB", "public_key": None}
    assert cli.main(["run", "samples", "--out", str(tmp_path / "out"), "--bundle", "b"]) == 2
    assert received["precision"] is None and received["channel_order"] == "BGR"  # auto: the bundle's gated choice


def test_run_help_says_what_a_bare_number_means(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "A bare number (0, 1, ...) is always a camera index" in help_text and "./0" in help_text


def test_the_runtime_command_line_never_imports_torch_and_still_offers_the_training_commands():
    code = (
        "import sys; from leukoedge.cli import build_parser; parser = build_parser(); "
        "assert 'torch' not in sys.modules, 'the command line imported torch'; "
        "print(' '.join(parser._subparsers._group_actions[0].choices))"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert set(completed.stdout.split()) >= {"run", "info", "bench", "adapt", "train", "evaluate", "study", "pretrain", "ensemble", "calibrate", "gate"}
    source = Path(cli.__file__).read_text()
    assert "def command_train" not in source and "def command_evaluate" not in source


def test_each_cell_line_names_the_wbc_type_of_a_normal_cell_and_the_subtype_of_a_blast(capsys):
    import dataclasses

    from leukoedge import Detector

    frame = cv2.imread(str(Path(__file__).resolve().parents[2] / "samples" / "pbc_lymphocyte_LY_131013.jpg"))
    with Detector.load(default_bundle(), threads=1) as detector:
        result = detector.run(frame)
    cli.print_result("lymphocyte.jpg", result)
    normal = capsys.readouterr().out
    assert "normal" in normal and "wbc_type=lymphocyte" in normal and "subtype=" not in normal
    as_blast = dataclasses.replace(result, cells=[dataclasses.replace(cell, label="blast") for cell in result.cells])
    cli.print_result("lymphocyte.jpg", as_blast)
    blast = capsys.readouterr().out
    assert "subtype=" in blast and "wbc_type=" not in blast


def test_info_names_the_runtime_checks_a_bundle_with_a_domain_check_gets(capsys):
    """The frame corrections and the unfitted checks are the runtime's, not the manifest's: info says they apply."""
    assert cli.main(["info", str(Path(__file__).resolve().parents[2] / "models" / "default")]) == 0
    out = capsys.readouterr().out
    assert "runtime checks: black outside a field of view filled and light falling off by 25% or more evened" in out
    assert "red and blue swapped" in out and "flat or repeating rows over 2%" in out


def test_ctrl_c_during_a_folder_run_prints_the_counts_so_far_and_leaves_no_part_of_a_frame_s_files(tmp_path, monkeypatch, capsys):
    from leukoedge import session as session_module

    images = tmp_path / "images"
    images.mkdir()
    samples = sorted((Path(__file__).resolve().parents[2] / "samples").glob("bccd_*.jpg"))
    for sample in samples:
        shutil.copy(sample, images / sample.name)
    real_write_file, calls = session_module.write_file, []

    def interrupted_on_the_second_json(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second frame's JSON (its overlay is written already): Ctrl-C (write_file's own cleanup: below)
            raise KeyboardInterrupt
        real_write_file(path, data)

    monkeypatch.setattr(session_module, "write_file", interrupted_on_the_second_json)
    out = tmp_path / "out"
    assert cli.main(["run", str(images), "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert "1 frame(s) judged" in captured.out and "stopped by Ctrl-C" in captured.err
    second = Path(samples[1].name).stem
    assert sorted(path.name for path in out.iterdir()) == [f"{Path(samples[0].name).stem}.json", f"{Path(samples[0].name).stem}_overlay.png"]
    assert not (out / f"{second}_overlay.png").exists()


def test_write_file_leaves_no_part_of_a_file_on_ctrl_c(tmp_path, monkeypatch):
    from leukoedge.session import files

    class Interrupted:
        def __init__(self, real):
            self.real = real

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

        def write(self, data):
            self.real.write(data[:3])
            raise KeyboardInterrupt

    real_open = open
    monkeypatch.setattr(files, "open", lambda path, mode: Interrupted(real_open(path, mode)), raising=False)
    with pytest.raises(KeyboardInterrupt):
        files.write_file(tmp_path / "result.json", b"0123456789")
    assert not (tmp_path / "result.json").exists()


def test_commands_that_take_a_folder_of_images_read_what_run_reads(tmp_path):
    # adapt, bench and soak list a folder as `leukoedge run` does: a device's .webp frames are not left out of adapt.
    from leukoedge.cli import image_paths

    field = np.full((64, 64, 3), 120, np.uint8)
    for name in ("b.webp", "a.png", "c.jpg"):
        cv2.imwrite(str(tmp_path / name), field)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [path.name for path in image_paths(tmp_path)] == ["a.png", "b.webp", "c.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LeukoedgeError, match=r"no images \(.*\.webp.*\) in folder"):
        image_paths(tmp_path / "empty")
