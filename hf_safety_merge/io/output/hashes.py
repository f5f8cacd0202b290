"""Streamed sha256 file hashes for the merge report and `--verify` (`sha256_file`, `sha256_files`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

#: read size of `sha256_file` (large sequential reads; the buffer is reused)
HASH_CHUNK = 4 * 2**20


def sha256_file(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """The sha256 of a file, read in `chunk`-byte pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]], workers: int | None = None) -> dict[Path, str]:
    """sha256 of several files, on up to `workers` threads (hashlib releases the GIL)."""
    files = list(dict.fromkeys(Path(p) for p in paths))
    n = workers or min(4, os.cpu_count() or 1)
    if len(files) <= 1 or n <= 1:
        return {f: sha256_file(f) for f in files}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(n, len(files)), thread_name_prefix="hf-safety-merge-hash") as ex:
        return dict(zip(files, ex.map(sha256_file, files), strict=True))
