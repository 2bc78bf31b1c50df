"""Reading an offline W&B run back, as ``wandb sync`` would send it.

W&B (0.31) writes an offline run as one ``run-<id>.wandb`` file: a 7-byte
header (``:W&B``, two magic bytes, a version byte), then LevelDB's log format:
blocks of 32 KiB, each record a 7-byte header (CRC32, little-endian length,
type: full, first, middle, last) and its bytes; a full record, or the pieces
of a split one joined, is a ``wandb_internal_pb2.Record``. A table is logged as
an artifact: its JSON and the images in its cells are staged, until a sync
uploads them, under W&B's data folder (``$WANDB_DATA_DIR``; the tests give
it one of their own).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file, in order, up to the last one written in full."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces = HEADER, []
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0:  # zeros: the rest of the block is padding
            position += left
            continue
        payload = data[position + HEADER : position + HEADER + length]
        if len(payload) < length:  # W&B's service is still writing this record
            return
        position += HEADER + length
        pieces = [payload] if kind in (FULL, FIRST) else [*pieces, payload]
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class Artifact:
    """An artifact as logged: its files are path -> the copy W&B staged for the upload."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, Path]


@dataclass
class OfflineRun:
    """What an offline run holds: its settings, metric definitions, history rows and summary."""

    folder: Path
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> its MetricRecord
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    #: Each artifact logged (a table is one, a checkpoint another).
    artifacts: list[Artifact] = field(default_factory=list)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def table(self, key: str) -> tuple[dict[str, Any], dict[str, Path]]:
        """The last table logged under ``key`` (its columns, data and column types), and the
        files of its artifact (the images its cells point to), from the copies W&B staged
        for ``wandb sync``."""
        name = key.replace("/", "")
        files = [a.files for a in self.artifacts if a.name.split("-")[2] == name][-1]
        (table,) = [path for entry, path in files.items() if entry.endswith(".table.json")]
        return json.loads(table.read_text()), files


def read_offline_run(folder: Path, wait_for: str | None = None) -> OfflineRun:
    """An offline run folder (``offline-run-*``) read back. W&B's service process may write its
    last records after the run has finished: with ``wait_for``, wait (up to 30 s) for a key
    to appear in the summary."""
    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + 30
    while True:
        run = _read(folder, path)
        if wait_for is None or wait_for in run.summary or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _read(folder: Path, path: Path) -> OfflineRun:
    run = OfflineRun(folder)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.group, run.job_type = record.run.run_group, record.run.job_type
            run.tags = list(record.run.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            artifact = record.artifact
            run.artifacts.append(Artifact(
                artifact.name, artifact.type, list(artifact.aliases),
                json.loads(artifact.metadata or "{}"),
                {c.path: Path(c.local_path) for c in artifact.manifest.contents},
            ))  # fmt: skip
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return run
