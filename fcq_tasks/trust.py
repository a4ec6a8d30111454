"""Signatures: who wrote a value that crossed Redis.

Every host has an Ed25519 key pair. The private key stays in the host's
``host_key_file`` (mode 0600); the public key, with the host's migration
address, is in the host's record ``<cluster.hosts_dir>/<host>.yaml``, which
the inventory hands to every host (docs/security.md). Redis is shared by
every host, so a value read from it says nothing about who wrote it; a
signature does.

What is signed is a *purpose* and a set of fields, encoded canonically
(sorted JSON), so a signature made for one purpose or one attempt can never
be presented for another.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fcq_tasks.errors import ConfigError

#: An Ed25519 signature, base64: 88 characters.
SIGNATURE_CHARS = 88


def _canonical(purpose: str, fields: dict[str, str]) -> bytes:
    return json.dumps({"purpose": purpose, **fields}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def sign(key: Ed25519PrivateKey, purpose: str, fields: dict[str, str]) -> str:
    return base64.b64encode(key.sign(_canonical(purpose, fields))).decode()


def verify(key: Ed25519PublicKey, purpose: str, fields: dict[str, str], signature: str) -> bool:
    """True only for a signature by *key* over exactly *purpose* and *fields*."""
    if not isinstance(signature, str) or len(signature) != SIGNATURE_CHARS:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), _canonical(purpose, fields))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def document_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of *doc* as canonical JSON (what a signed record or result says)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def sign_document(key: Ed25519PrivateKey, purpose: str, doc: dict[str, Any],
                  **context: str) -> str:
    """Sign *doc* (every key of it) for *purpose*; *context* binds it further (a task id)."""
    return sign(key, purpose, {**context, "digest": document_digest(doc)})


def verify_document(key: Ed25519PublicKey, purpose: str, doc: dict[str, Any], signature: object,
                    **context: str) -> bool:
    if not isinstance(signature, str):
        return False
    try:
        digest = document_digest(doc)
    except (TypeError, ValueError):
        return False
    return verify(key, purpose, {**context, "digest": digest}, signature)


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The public half of *key* as it is written in a host record (raw, base64)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(source: str, field: str, text: object) -> Ed25519PublicKey:
    if not isinstance(text, str):
        raise ConfigError(source, field, "must be an Ed25519 public key, base64 (44 characters)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ConfigError(source, field, f"is not base64: {err}") from err
    if len(raw) != 32:
        raise ConfigError(source, field, f"must be 32 bytes (an Ed25519 public key), "
                          f"got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(path: Path, field: str = "host_key_file") -> Ed25519PrivateKey:
    """The key at *path*; refused unless it is an Ed25519 key no one else may read."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(str(path), field, f"cannot be read: {err.strerror or err} "
                          "(make one with: fcq --local keygen)") from err
    if mode & 0o077:
        raise ConfigError(str(path), field, f"has mode {mode:04o}: a private key must not be "
                          "readable by group or others (chmod 0600)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(path), field, f"is not a PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(str(path), field, "must be an Ed25519 key")
    return key


def cached_private_key(path: Path, field: str = "host_key_file") -> Ed25519PrivateKey:
    """load_private_key, read again only when the file changed (a key read per heartbeat)."""
    st = os.stat(path)
    return _cached_key(str(path), st.st_mtime_ns, st.st_ino, field)


@functools.lru_cache(maxsize=8)
def _cached_key(path: str, mtime_ns: int, inode: int, field: str) -> Ed25519PrivateKey:
    return load_private_key(Path(path), field)


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """Write a new key to *path* (mode 0600, never over an existing file) and return it."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key
