"""training.pipeline: which cells the classifier learns from, on the real data in ../shared/data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from leukoedge.bundle import load_bundle
from leukoedge.preprocess.cpu import PreprocessSpec
from leukoedge.training import data
from leukoedge.training.pipeline import NORMAL_CELL_SOURCES, SUBTYPES, PipelineConfig, load_cell_examples
from leukoedge.training.train import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_taleqani_cells_come_from_the_segmenter_so_pro_fields_give_cells(data_root: Path, tmp_path: Path) -> None:
    # The authors' weak masks keep no cell in most Pro fields; the cells the segmenter finds, as at run
    # time, exist in every field, each labelled with its field's subtype and blast.
    segmenter, _ = load_checkpoint(REPO / "models" / "checkpoints" / "default-segmenter.pt")
    spec = PreprocessSpec.from_manifest(load_bundle(REPO / "models" / "default").manifest["preprocess"])
    config = PipelineConfig(data_root=data_root, out_dir=tmp_path, quick=True)
    examples, counts = load_cell_examples(config, "test", segmenter, spec)
    taleqani = [example for example in examples if example.source == "all-taleqani"]
    assert counts["all-taleqani"] == len(taleqani)
    fields = Counter(record.subtype for record in config.limit(data.load_records(data_root, "all-taleqani", "test")))
    cells = Counter(SUBTYPES[example.targets["subtype"]] for example in taleqani)
    assert fields["Pro"] > 0
    for subtype, count in fields.items():
        assert cells[subtype] >= count, f"{subtype}: {cells[subtype]} cells from {count} fields"
    assert all(example.targets["blast"] == int(SUBTYPES[example.targets["subtype"]] != "Benign") for example in taleqani)


def test_the_refiner_learns_from_the_mask_sources_the_segmenter_learns_from_unless_told(tmp_path: Path) -> None:
    assert PipelineConfig(tmp_path, tmp_path).refiner_sources == ("wbc-seg-zheng", "all-idb2", "all-taleqani")
    experts = PipelineConfig(tmp_path, tmp_path, segmentation_sources=("wbc-seg-zheng", "all-idb2"))
    assert experts.refiner_sources == ("wbc-seg-zheng", "all-idb2")
    assert PipelineConfig(tmp_path, tmp_path, refiner_sources=("all-idb2",)).refiner_sources == ("all-idb2",)
    with pytest.raises(ValueError, match="refiner_sources must be some of"):
        PipelineConfig(tmp_path, tmp_path, refiner_sources=("pbc",))  # labels per image: no cell mask or box to learn
    boxed = PipelineConfig(tmp_path, tmp_path, refiner_sources=("wbc-seg-zheng", "bccd", "txl-pbc/bcd"))  # boxed cells: how far a cell reaches
    assert boxed.refiner_sources == ("wbc-seg-zheng", "bccd", "txl-pbc/bcd")
    with pytest.raises(ValueError, match="refiner_sources must be some of"):
        PipelineConfig(tmp_path, tmp_path, segmentation_sources=("bccd",))


def test_the_classifier_can_leave_all_idb2_out_but_not_the_only_sources_of_a_head(data_root: Path, tmp_path: Path) -> None:
    segmenter, _ = load_checkpoint(REPO / "models" / "checkpoints" / "default-segmenter.pt")
    spec = PreprocessSpec.from_manifest(load_bundle(REPO / "models" / "default").manifest["preprocess"])
    everything = PipelineConfig(data_root=data_root, out_dir=tmp_path, quick=True)
    without = PipelineConfig(data_root=data_root, out_dir=tmp_path, quick=True, classification_sources=("all-taleqani", "pbc"))
    all_examples, all_counts = load_cell_examples(everything, "test", segmenter, spec)
    normal = [example for example in all_examples if example.source.split("/")[0] in NORMAL_CELL_SOURCES]
    # Normal smears of other labs and devices: white cells the blast head learns as normal, nothing else.
    assert {example.source for example in normal} >= {"bccd", "txl-pbc/raabin", "txl-pbc/bcd", "wbc-seg-zheng"}
    assert all(example.targets == {"blast": 0} for example in normal)
    examples, counts = load_cell_examples(without, "test", segmenter, spec)
    assert all_counts["all-idb2"] > 0 and "all-idb2" not in counts
    assert {example.source for example in examples} == {"all-taleqani", "pbc"}
    assert counts["all-taleqani"] == all_counts["all-taleqani"] and counts["pbc"] == all_counts["pbc"]
    for sources in (("all-idb2", "pbc"), ("all-idb2", "all-taleqani"), ("all-taleqani", "pbc", "no-such-source")):
        with pytest.raises(ValueError, match="classification_sources must be some of"):
            PipelineConfig(tmp_path, tmp_path, classification_sources=sources)


def test_the_segmenter_can_learn_one_txl_pbc_device_without_moving_the_stain_reference(data_root: Path, tmp_path: Path) -> None:
    from leukoedge.training.pipeline import load_segmentation_examples, preprocess_spec

    with pytest.raises(ValueError, match="segmentation_sources must be some of"):
        PipelineConfig(tmp_path, tmp_path, segmentation_sources=("bccd", "txl-pbc/unknown"))
    masks = PipelineConfig(data_root, tmp_path, quick=True, segmentation_sources=("wbc-seg-zheng", "bccd"))
    boxes = PipelineConfig(data_root, tmp_path, quick=True, segmentation_sources=("wbc-seg-zheng", "bccd", "txl-pbc/bcd"))
    mask_examples, box_examples = load_segmentation_examples(masks, "train"), load_segmentation_examples(boxes, "train")
    bcd = [example for example in box_examples if example.source == "txl-pbc/bcd"]
    assert bcd and len(box_examples) == len(mask_examples) + len(bcd)  # raabin's fields stay out
    # Every model of a bundle reads frames normalized to the reference: more segmenter fields must not move it.
    assert preprocess_spec(boxes, box_examples).stain_reference == preprocess_spec(masks, mask_examples).stain_reference


def test_the_refiner_learns_boxed_cells_of_one_device_with_their_box_labels(data_root: Path, tmp_path: Path) -> None:
    from leukoedge.training.pipeline import load_refiner_examples

    config = PipelineConfig(data_root, tmp_path, quick=True, refiner_sources=("wbc-seg-zheng", "txl-pbc/bcd"))
    examples = load_refiner_examples(config, "train")
    bcd = [example for example in examples if example.source == "txl-pbc/bcd"]
    assert bcd and {example.source for example in examples} == {"wbc-seg-zheng", "txl-pbc/bcd"}
    for example in bcd:
        x0, y0, x1, y1 = example.box
        assert example.label_map[(y0 + y1) // 2, (x0 + x1) // 2] == data.LABEL_WBC  # the box's core: white cell
