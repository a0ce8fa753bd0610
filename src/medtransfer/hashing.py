"""Hashing a file, in one place: the fingerprint of a dataset's source file and of a source's weights file, and the
integrity check of a download against its published MD5."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_bytes: int = CHUNK_BYTES) -> str:
    """The hex digest of a file's bytes, read in chunks so that a large file never sits in memory whole."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    return file_digest(path, "sha256", chunk_bytes)


def file_md5(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """MD5, for the checksums MedMNIST publishes: integrity, not security."""
    return file_digest(path, "md5", chunk_bytes)
