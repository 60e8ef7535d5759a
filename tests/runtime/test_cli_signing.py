"""`leukoedge sign` and `--public-key`: a signed bundle loads with its pinned key and nothing else does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from leukoedge.cli import main

pytest.importorskip("cryptography", reason="signing needs the [signing] extra (cryptography)")

from leukoedge.signing import new_key_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_sign_then_info_with_the_key_and_a_re_edited_manifest_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "models" / "default", bundle)
    private, public = new_key_pair()
    (tmp_path / "key").write_bytes(private)
    (tmp_path / "key.pub").write_bytes(public)
    assert main(["sign", str(bundle), "--private-key", str(tmp_path / "key")]) == 0
    assert (bundle / "manifest.json.sig").is_file()
    assert main(["info", str(bundle), "--public-key", str(tmp_path / "key.pub")]) == 0
    assert "signature: manifest.json.sig verified" in capsys.readouterr().out
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["verdict"]["flag_fraction"] = 0.99  # every checksum still holds: only the signature can tell
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["info", str(bundle), "--public-key", str(tmp_path / "key.pub")]) == 2
    assert "does not verify with the pinned public key" in capsys.readouterr().err
