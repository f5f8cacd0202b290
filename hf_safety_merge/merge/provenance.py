"""Provenance: the files a merge read and wrote (`merge_report.json` "files": sha256 per file), the
check of a merge's inputs against a previous report (`--verify`), and the hashing of the shards as
they are written.

Layer 4 (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, IntegrityError
from ..io.checkpoints import InMemorySource, LoraCheckpoint, SafetensorsCheckpoint, TensorSource
from ..io.hub import AUX_PATTERNS, HubCheckpoint
from ..io.output import TMP_MARKER, sha256_files
from ..io.safetensors_stream import StreamingShardWriter, _header_bytes
from ..methods.base import build_method
from ..vectors import SUBSPACE_CACHE, VECTOR_CONFIG, SafetyVector
from .config import SafetyMergeConfig
from .plan import open_reference, open_task

#: the report a merge writes beside the weights
REPORT_NAME = "merge_report.json"

#: files beside the weights that a merge reads or copies, recorded (and verified) with them
_META_FILES = (*AUX_PATTERNS, VECTOR_CONFIG, SUBSPACE_CACHE, "adapter_config.json")


def _source_records(role: str, given: str | None, src: TensorSource) -> list[dict[str, Any]]:
    if isinstance(src, HubCheckpoint):
        return [{"role": role, "source": given, "repo": src.repo_id, "revision": src.commit, "file": f}
                for f in sorted({src.file_of(n) for n in src})]
    if isinstance(src, InMemorySource) or src.path is None:
        return []
    folder = src.path
    weights = src.files() if isinstance(src, SafetensorsCheckpoint) else sorted({Path(src.where(n)) for n in src})
    paths = [f for f in weights if f.is_file()]
    paths += sorted(folder.glob("*.index.json")) + [folder / n for n in _META_FILES if (folder / n).is_file()]
    records = []
    for f in dict.fromkeys(paths):
        try:
            name = f.relative_to(folder).as_posix()
        except ValueError:
            name = f.name
        records.append({"role": role, "source": given, "path": str(f.resolve()), "file": name, "bytes": f.stat().st_size})
    return records


def input_records(config: SafetyMergeConfig, task: TensorSource, ref: TensorSource | None,
                   vector: SafetyVector) -> list[dict[str, Any]]:
    """One record per input file: role, the config's value, the local path (or Hub repo,
    commit and file), its size; `hash_inputs` adds the sha256."""
    records: list[dict[str, Any]] = []
    if isinstance(task, LoraCheckpoint):
        records += _source_records("task_model", config.task_model, task.base)
        records += _source_records("task_adapter", config.task_adapter, task.adapter)
    else:
        records += _source_records("task_model", config.task_model, task)
    if ref is not None and ref is not getattr(task, "base", None):
        records += _source_records("task_reference", config.task_reference, ref)
    records += _source_records("safety_vector", config.safety_vector, vector.source)
    return records


def hash_inputs(records: list[dict[str, Any]]) -> None:
    digests = sha256_files(r["path"] for r in records if "path" in r)
    for r in records:
        if "path" in r:
            r["sha256"] = digests[Path(r["path"])]


def load_manifest(verify: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The input records of a previous merge's report (a `merge_report.json` or its folder)."""
    path = Path(verify).expanduser()
    if path.is_dir():
        path = path / REPORT_NAME
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"verify: cannot read {path} ({e.strerror or e}); give a merge_report.json written with "
                          "--hash-inputs (or its folder)") from e
    except ValueError as e:
        raise ConfigError(f"verify: {path} is not valid JSON ({e})") from e
    files = data.get("files") if isinstance(data, dict) else None
    inputs = files.get("inputs") if isinstance(files, dict) else None
    recorded = [r for r in inputs or [] if isinstance(r, dict) and r.get("sha256") and r.get("role") and r.get("file")]
    if not recorded:
        raise ConfigError(f"verify: {path} records no sha256 of input files; it was written without --hash-inputs "
                          "(hash_inputs=True): run that merge again with --hash-inputs to record them")
    return path, recorded


def verify_inputs(config: SafetyMergeConfig, report: str | Path) -> int:
    """Check, without merging, that the local input files of `config` hash to what `report` (a
    previous merge's `merge_report.json`, or its folder) recorded; raises `IntegrityError`
    naming the first file that changed. Returns the number of files checked."""
    path, recorded = load_manifest(report)
    method = build_method(config.method, config.parameters)
    task = open_task(config)
    ref: TensorSource | None = None
    vector: SafetyVector | None = None
    try:
        ref = open_reference(config, method, task)
        vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
        records = input_records(config, task, ref, vector)
        hash_inputs(records)
        check_recorded_inputs(records, path, recorded)
        return sum("sha256" in r for r in records)
    finally:
        task.close()
        if ref is not None and ref is not getattr(task, "base", None):
            ref.close()
        if vector is not None:
            vector.close()


def check_recorded_inputs(records: list[dict[str, Any]], report: Path, recorded: list[dict[str, Any]]) -> None:
    """Refuse, naming the file, when a local input's sha256 differs from the one `report`
    recorded for the same role and file (Hub inputs are pinned by commit: not hashed here)."""
    known = {(r["role"], r["file"]): r for r in recorded}
    for r in records:
        if "sha256" not in r:
            continue
        old = known.get((r["role"], r["file"]))
        if old is None:
            raise IntegrityError(f"{r['path']}: {report} records no sha256 for the {r['role']} file {r['file']!r}; "
                                 "verify against the report of a merge of these same inputs")
        if old["sha256"] != r["sha256"]:
            raise IntegrityError(
                f"{r['path']}: sha256 {r['sha256'][:16]}... differs from {old['sha256'][:16]}... recorded in {report} "
                f"for the {r['role']} file {r['file']!r}: the file changed since that merge (corrupted on disk, or "
                "replaced); nothing was merged"
            )


class ShardHasher:
    """The sha256 of each output shard, computed on the writer thread as its tensors are written
    (the shard's header, then each tensor's bytes, as `StreamingShardWriter` lays them out), so
    that hashing the output overlaps the merge instead of reading every file again at the end.
    `written(tensor)` is the writer's `release` callback; `release` is passed each tensor after."""

    def __init__(self, writer: StreamingShardWriter, release: Callable[[torch.Tensor], Any] | None) -> None:
        self._writer = writer
        self._order = [(i, t) for i, shard in enumerate(writer.shards) for t in shard]
        self._pos = 0
        self._hashes: dict[int, Any] = {}
        self._release = release

    def written(self, tensor: torch.Tensor) -> None:
        i, _spec = self._order[self._pos]
        h = self._hashes.get(i)
        if h is None:
            h = self._hashes[i] = hashlib.sha256(_header_bytes(self._writer.shards[i], self._writer.metadata))
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        self._pos += 1
        if self._release is not None:
            self._release(tensor)

    def digests(self) -> dict[str, str]:
        """{shard file name: sha256}, once every tensor was written (else empty: hash the files)."""
        if self._pos != len(self._order):
            return {}
        return {self._writer.files[i]: h.hexdigest() for i, h in self._hashes.items()}


def record_files(folder: Path, inputs: list[dict[str, Any]], known: dict[str, str] | None = None) -> None:
    """Add the `files` record to the report in `folder` (after `finalize`, which may edit the
    report and the card): the inputs, and every output file's size and sha256 (`known`: those
    hashed while they were written)."""
    report_file = folder / REPORT_NAME
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p != report_file and p.name != TMP_MARKER)
    known = known or {}
    digests = sha256_files(p for p in outputs if p.relative_to(folder).as_posix() not in known)
    digests.update({folder / name: d for name, d in known.items()})
    report = json.loads(report_file.read_text())
    report["files"] = {
        "algorithm": "sha256",
        "inputs": inputs,
        "outputs": [{"file": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": digests[p]}
                    for p in outputs],
    }
    report_file.write_text(json.dumps(report, indent=2) + "\n")


