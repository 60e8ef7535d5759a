"""scripts/peer_segmenters.py: torchvision's LR-ASPP MobileNetV3-Large written out, for timing the segmenter
against it (issue 24) where torchvision cannot be installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the peer is a PyTorch model (training extra)")


def test_the_peer_has_torchvisions_architecture_by_its_documented_parameter_count(script) -> None:
    peers = script("peer_segmenters")
    # torchvision's model table: lraspp_mobilenet_v3_large (21 classes) has 3,221,538 parameters
    assert sum(p.numel() for p in peers.create_peer("lraspp_mobilenet_v3_large", 21).parameters()) == 3_221_538


def test_the_peer_segments_at_its_input_size_from_stride_8_and_dilated_stride_16_features(script) -> None:
    peers = script("peer_segmenters")
    model = peers.create_peer("lraspp_mobilenet_v3_large").eval()
    image = torch.zeros(1, 3, 192, 256)
    with torch.no_grad():
        low = model.features[: peers._LOW_BLOCK + 1](image)
        high = model.features[peers._LOW_BLOCK + 1 :](low)
        assert model(image).shape == (1, 3, 192, 256)
    assert low.shape == (1, 40, 24, 32) and high.shape == (1, 960, 12, 16)


def test_an_unknown_peer_is_refused_by_name(script) -> None:
    with pytest.raises(ValueError, match="lraspp_mobilenet_v3_large"):
        script("peer_segmenters").create_peer("deeplabv3")
