"""Driver-side job state, one JSON version per micro-batch, next to the Spark checkpoint.

Batch N starts from the newest version saved by a batch < N, so a batch that Spark replays after a
crash (same id, same input) recomputes from the same state and rewrites the same outputs: nothing
is counted twice. Saves are atomic (temp file, fsync, rename); the last few versions are kept.
The directory must be a local (or mounted) path: the state is small and read by the driver only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(\d{12})\.json$")
KEEP_VERSIONS = 5


class StateStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _versions(self) -> list[int]:
        out = []
        for entry in self.dir.iterdir():
            m = _NAME.match(entry.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _path(self, batch_id: int) -> Path:
        return self.dir / f"{batch_id:012d}.json"

    def load_before(self, batch_id: int) -> dict[str, Any]:
        older = [v for v in self._versions() if v < batch_id]
        if not older:
            return {}
        with self._path(older[-1]).open(encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return data

    def save(self, batch_id: int, state: dict[str, Any]) -> None:
        tmp = self.dir / f".{batch_id:012d}.json.tmp"
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(batch_id))
        versions = self._versions()
        for v in versions:
            # Versions above this batch belong to an abandoned future (a replay, or a checkpoint
            # that was reset): they must never be loaded again.
            if v > batch_id or v < batch_id - KEEP_VERSIONS:
                self._path(v).unlink(missing_ok=True)
