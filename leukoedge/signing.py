"""Ed25519 signatures over a bundle's manifest.json, checked with a public key the integrator pins.

manifest.json lists the sha256 of every file of the bundle, so one signature over its exact bytes vouches
for every model and every setting. The signature lies beside it as manifest.json.sig: one line, base64
of the 64 signature bytes. The cryptography package (pip install "leukoedge[signing]") is imported
here only, and only when a signature is made or checked.

Keys: a private key signs (bundle.sign_bundle); the integrator pins the public key in the device's
software and loads with Detector.load(path, public_key=...). A key is given as a cryptography key
object, as bytes (PEM, OpenSSH "ssh-ed25519 ..." for public keys, or the 32 raw key bytes), or as the
path (str or Path) of a file holding one of these.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from .errors import BundleError

SIGNATURE_NAME = "manifest.json.sig"
SIGNATURE_BYTES = 64  # an Ed25519 signature
_RAW_KEY_BYTES = 32  # an Ed25519 key, public or private, in its raw form
_MAX_KEY_FILE_BYTES = 16 * 1024

KeyLike = Any  # Ed25519PublicKey / Ed25519PrivateKey, bytes, str or os.PathLike (a key file)


def _cryptography() -> tuple[Any, Any, Any]:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as error:
        raise BundleError('bundle signatures need the cryptography package: pip install "leukoedge[signing]"') from error
    return ed25519, serialization, InvalidSignature


def _key_bytes(key: KeyLike, what: str) -> bytes:
    if isinstance(key, (str, os.PathLike)):
        path = Path(key)
        try:
            if path.stat().st_size > _MAX_KEY_FILE_BYTES:
                raise BundleError(f"{what} file {path} is over {_MAX_KEY_FILE_BYTES} bytes: not a key")
            return path.read_bytes()
        except OSError as error:
            raise BundleError(f"{what} file {path} cannot be read: {error}") from error
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    raise BundleError(f"{what} must be an Ed25519 key, bytes (PEM, OpenSSH or raw) or a key file's path, got {type(key).__name__}")


def load_public_key(key: KeyLike) -> Any:
    """An Ed25519PublicKey from any of the forms the module docstring lists; BundleError otherwise."""
    ed25519, serialization, _ = _cryptography()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    data = _key_bytes(key, "public key")
    try:
        if len(data) == _RAW_KEY_BYTES:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        loaded = serialization.load_ssh_public_key(data) if data.startswith(b"ssh-") else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as error:
        raise BundleError(f"public key cannot be read as PEM, OpenSSH or raw Ed25519: {error}") from error
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise BundleError(f"public key is a {type(loaded).__name__}; bundle signatures are Ed25519")
    return loaded


def load_private_key(key: KeyLike) -> Any:
    """An Ed25519PrivateKey from a key object, unencrypted PEM (PKCS8) or OpenSSH, 32 raw bytes, or a file of one."""
    ed25519, serialization, _ = _cryptography()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data = _key_bytes(key, "private key")
    try:
        if len(data) == _RAW_KEY_BYTES:
            loaded = ed25519.Ed25519PrivateKey.from_private_bytes(data)
        elif data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):  # ssh-keygen's own format
            loaded = serialization.load_ssh_private_key(data, password=None)
        else:
            loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise BundleError(f"private key cannot be read as unencrypted PEM, OpenSSH or raw Ed25519: {error}") from error
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise BundleError(f"private key is a {type(loaded).__name__}; bundle signatures are Ed25519")
    return loaded


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as PEM: (private key, PKCS8 unencrypted: keep it off the devices; public key)."""
    ed25519, serialization, _ = _cryptography()
    private_key = ed25519.Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def signature_text(manifest_bytes: bytes, private_key: KeyLike) -> str:
    """The content of manifest.json.sig for these exact manifest bytes."""
    return base64.b64encode(load_private_key(private_key).sign(manifest_bytes)).decode("ascii") + "\n"


def verify_signature(manifest_bytes: bytes, signature: bytes, public_key: KeyLike) -> None:
    """Refuse (BundleError) unless `signature` (manifest.json.sig's content) signs these manifest bytes
    with the private key of `public_key`."""
    _, _, invalid_signature = _cryptography()
    key = load_public_key(public_key)
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BundleError(f"{SIGNATURE_NAME} is not base64: {error}") from error
    if len(raw) != SIGNATURE_BYTES:
        raise BundleError(f"{SIGNATURE_NAME} holds {len(raw)} bytes; an Ed25519 signature has {SIGNATURE_BYTES}")
    try:
        key.verify(raw, manifest_bytes)
    except invalid_signature as error:
        raise BundleError(
            f"{SIGNATURE_NAME} does not verify with the pinned public key: manifest.json was changed after it was "
            "signed, or signed with another key"
        ) from error
