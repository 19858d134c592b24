"""Checkpoint files of per-(image, σ) experiment records: long runs survive a timeout.

A record file is JSON lines: the first line ``{"settings": {...}}`` names what produced the
records (samples, seed, ...), every further line is one record. A run appends each record as
soon as it is computed; a later run with the same settings loads the records it finds instead
of recomputing them (so re-rendering a table from a finished or partial run costs nothing),
and refuses a file written with other settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: Record fields holding arrays (``var`` holds a dict of arrays).
ARRAY_FIELDS = ("mean", "mc_mean", "mc_var", "mc2_mean", "mc2_var")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _from_json(rec: dict) -> dict:
    out = dict(rec)
    for k in ARRAY_FIELDS:
        if k in out:
            out[k] = np.asarray(out[k], dtype=np.float64)
    if "var" in out:
        out["var"] = {m: np.asarray(v, dtype=np.float64) for m, v in out["var"].items()}
    return out


class RecordStore:
    """Records keyed by ``key_fields`` (e.g. ("image", "sigma")), backed by a JSON-lines file.

    ``path`` None keeps the records in memory only.
    """

    def __init__(self, path: Path | str | None, settings: dict, key_fields: tuple[str, ...]):
        self.path = None if path is None else Path(path)
        self.settings = _jsonable(settings)
        self.key_fields = key_fields
        self.records: dict[tuple, dict] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size > 0:
            text = self.path.read_text()
            if not text.endswith("\n"):  # cut by a timeout: the next record starts a new line
                with self.path.open("a") as f:
                    f.write("\n")
            lines = text.splitlines()
            head = json.loads(lines[0]).get("settings")
            if head != self.settings:
                raise SystemExit(
                    f"{self.path} holds records made with settings {head}, not {self.settings}: "
                    "use another --records file"
                )
            for line in lines[1:]:
                if line.strip():  # a line cut by a timeout is not valid JSON: recomputed
                    try:
                        rec = _from_json(json.loads(line))
                    except json.JSONDecodeError:
                        continue
                    self.records[self.key(rec)] = rec
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n")

    @staticmethod
    def read(path: Path | str) -> tuple[dict, list[dict]]:
        """(settings, records) of a record file, read only."""
        lines = Path(path).read_text().splitlines()
        recs = []
        for line in lines[1:]:
            try:
                recs.append(_from_json(json.loads(line)))
            except json.JSONDecodeError:
                continue
        return json.loads(lines[0])["settings"], recs

    def key(self, rec: dict) -> tuple:
        return tuple(rec[f] for f in self.key_fields)

    def get(self, *key) -> dict | None:
        return self.records.get(tuple(key))

    def add(self, rec: dict) -> None:
        """Keep ``rec`` and append it to the file at once."""
        self.records[self.key(rec)] = rec
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(_jsonable(rec)) + "\n")
