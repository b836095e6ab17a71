"""Labels for picked pool rows: who gives them, where they are kept, and the files a person
fills in.

- The label journal (`RUN/labels.jsonl`, append-only, fsynced line by line): one
  `LabelRecord` per labelled or skipped pool row. It is the only place labels live, so a
  run killed at any point loses none, and a row with a record is never asked again.
- To-label files (`RUN/to-label/round-N.csv` and `.jsonl`, written atomically): the rows
  of round N still waiting for a label, with the features each fills (and their
  summaries) and the model's score, and an empty `label` column.
- `read_labels`: a filled-in file (CSV or JSONL, the to-label layout; only `row` and
  `label` are read) checked line by line: an unknown row id, a row not waiting for a label,
  a label other than 0, 1, `skip` or empty, a repeated row — each an error naming the file
  and line. An empty label leaves the row queued; `skip` drops it from the round.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tools.data import write_text_atomic
from tools.errors import DataError

Labeler = Literal["human", "file", "judge"]
LABELERS: tuple[str, ...] = ("human", "file", "judge")
SKIP = "skip"


class LabelRecord(BaseModel):
    """One pool row's label, as the journal keeps it (label None: skipped)."""

    row: int = Field(ge=0, description="the row's index in the pool file (0-based)")
    label: int | None = Field(None, ge=0, le=1)
    round: int = Field(ge=0)
    source: Labeler
    at: float = Field(default_factory=time.time)


class PoolPick(BaseModel):
    """A pool row picked for labelling in a round, with why (the select node writes them;
    the label node reads them back)."""

    row: int = Field(ge=0, description="the row's index in the pool file (0-based)")
    text: str
    round: int = Field(ge=1)
    strategy: str
    score: float | None = None
    fills: list[int] = Field(default_factory=list, description="task features with a "
                             "deficit the row fills")


class ToLabel(BaseModel):
    """One row of a to-label file."""

    row: int
    text: str
    fills: str = Field("", description="the task features it fills, with their summaries")
    score: float | None = Field(None, description="the current model's score (1 = positive)")
    label: str = ""


class LabelJournal:
    """`RUN/labels.jsonl`: every label given so far, by pool row."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[int, LabelRecord]:
        """Row -> its record (the first one given: a row is labelled once). A torn last
        line (a process killed mid-write) is ignored."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_bytes().splitlines()
        out: dict[int, LabelRecord] = {}
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                rec = LabelRecord.model_validate_json(raw)
            except ValidationError:
                if lineno == len(lines):
                    break
                raise DataError(f"{self.path} line {lineno}: not a label record; restore the "
                                "file from a backup or remove the line") from None
            out.setdefault(rec.row, rec)
        return out

    def add(self, records: Iterable[LabelRecord]) -> int:
        """Append the records of rows not labelled yet; how many were new."""
        known = self.read()
        new = [r for r in records if r.row not in known]
        if not new:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n"):  # a torn last line: drop it (`read` did)
            with self.path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
        with self.path.open("ab") as f:
            for r in new:
                f.write(r.model_dump_json().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return len(new)


def write_to_label(folder: Path, round_: int, rows: Sequence[ToLabel]) -> tuple[Path, Path]:
    """`folder/round-N.csv` and `.jsonl` with `rows` (atomically); their paths."""
    csv_path, jsonl_path = folder / f"round-{round_}.csv", folder / f"round-{round_}.jsonl"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ToLabel.model_fields), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r.model_dump(), "score": "" if r.score is None else r.score})
    write_text_atomic(csv_path, buf.getvalue())
    write_text_atomic(jsonl_path, "".join(r.model_dump_json() + "\n" for r in rows))
    return csv_path, jsonl_path


def _rows_of(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) per data line of a CSV or JSONL labels file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the to-label file you filled in")
    text = path.read_text(encoding="utf-8-sig")
    out: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"row", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path} line 1: no {' or '.join(sorted(missing))} column; keep "
                            "the to-label file's header (row,text,fills,score,label)")
        for row in reader:
            out.append((f"{path} line {reader.line_num}", dict(row)))
        return out
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: a labels file is .csv or .jsonl (the to-label layout)")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object with row and label")
        out.append((f"{path} line {lineno}", obj))
    return out


def read_labels(path: Path, waiting: Iterable[int]) -> tuple[dict[int, int | None], int]:
    """The labels in a filled-in file for rows in `waiting`: row -> 0, 1 or None (skip);
    rows left empty are not in it. Also how many lines were left empty. Any bad line is a
    DataError naming the file and line (see the module doc)."""
    waiting = set(waiting)
    got: dict[int, int | None] = {}
    seen: dict[int, str] = {}
    empty = 0
    for where, row in _rows_of(path):
        raw_id = row.get("row")
        try:
            rid = int(str(raw_id).strip()) if not isinstance(raw_id, bool) else None
        except ValueError:
            rid = None
        if rid is None:
            raise DataError(f"{where}: field 'row' is {raw_id!r}, not a row id; keep the ids "
                            "of the to-label file")
        if rid in seen:
            raise DataError(f"{where}: row {rid} again (first at {seen[rid]}); label each row "
                            "once")
        seen[rid] = where.rsplit(" ", 1)[-1]
        if rid not in waiting:
            raise DataError(f"{where}: row {rid} is not waiting for a label in this run "
                            f"({len(waiting)} rows are; see the newest to-label file)")
        value = row.get("label")
        text = "" if value is None else str(value).strip().lower()
        if text == "":
            empty += 1
            continue
        if text == SKIP:
            got[rid] = None
        elif text in ("0", "1", "0.0", "1.0") and not isinstance(value, bool):
            got[rid] = int(float(text))
        else:
            raise DataError(f"{where}: label {value!r} for row {rid}: write 0, 1, skip, or "
                            "leave it empty to label it later")
    return got, empty
