"""Loading and validating text datasets (JSONL, CSV, Parquet, Hugging Face hub).

Every problem becomes a DataError naming the file, the line (or row) and the field, so
users can fix their data without reading a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from tools.errors import DataError, FileAccessError

logger = logging.getLogger(__name__)

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SUFFIXES = ".jsonl, .json, .csv or .parquet"

Row = tuple[str, dict[str, Any]]  # (where, e.g. "data.jsonl line 3"; the row's fields)


@dataclass(frozen=True)
class TextDataset:
    """Validated texts with 0/1 labels, or labels=None when the source has none."""

    texts: list[str]
    labels: list[int] | None
    source: str
    paired: bool = False
    """Rows come in (1, 0) pairs, the two sides of one item (a pair task's contrast): the
    label judge compares the sides within each pair (tools/coverage.py)."""

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.paired and (self.labels is None or self.labels != [1, 0] * (len(self) // 2)
                            or len(self) % 2):
            raise ValueError("paired rows need labels 1, 0, 1, 0, ... (chosen, rejected)")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_positive(self) -> int:
        """Rows labelled 1; 0 for unlabelled data."""
        return sum(self.labels) if self.labels is not None else 0

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """The rows at `indices`, in that order (for splits and sampling)."""
        idx = list(indices)
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return TextDataset([self.texts[i] for i in idx], labels, self.source)


def load_texts(
    source: str | Path,
    *,
    text_field: str = "text",
    label_field: str | None = "label",
    require_labels: bool = False,
) -> TextDataset:
    """Load texts and 0/1 labels from a local file or a Hugging Face dataset id.

    The suffix picks the format; a string that is neither a known suffix nor an
    existing path is a hub id, optionally `id:split` (default split "train").
    """
    if require_labels and label_field is None:
        raise DataError("require_labels=True needs a label_field, e.g. 'label'")
    fields = [text_field] if label_field is None else [text_field, label_field]
    rows = _read(source, fields, required=text_field)
    ds = _validate(rows, str(source), text_field, label_field, require_labels)
    logger.info("loaded %d texts (%d positive) from %s", len(ds), ds.n_positive, source)
    return ds


def read_rows(source: str | Path, fields: Sequence[str]) -> Iterable[Row]:
    """The raw rows of a local file or Hugging Face dataset id, as `load_texts` finds them:
    (where, fields) pairs, `where` naming the file and line (or row) for error messages.
    Tables and hub datasets yield only the named `fields` they have; JSONL rows keep all
    theirs. Nothing is validated: the caller checks its own schema per row (tasks with rows
    other than text + label, e.g. tools/tasks/reward.py)."""
    return _read(source, list(fields), required=None)


def _read(source: str | Path, fields: list[str], required: str | None) -> Iterable[Row]:
    """Pick the reader by suffix; a string that is neither a known suffix nor an existing
    path is a hub id. `required`: a field every table must have (checked once, up front)."""
    path, name = Path(source), str(source)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None and not path.exists() and not _looks_like_path(name):
        return _hub_rows(name, fields, required)
    if not path.is_file():
        problem = "is a directory" if path.exists() else "file not found"
        raise DataError(f"{path}: {problem}; pass an existing {_SUFFIXES} file")
    if fmt is None:
        raise DataError(f"{path}: unsupported format '{path.suffix}'; use {_SUFFIXES}")
    if fmt == "json":
        return _jsonl_rows(path)
    return _table_rows(path, fmt, fields, required)


def _looks_like_path(source: str) -> bool:
    """True for strings no hub dataset id looks like (`org/name` or `name`, optionally
    `:split`): `./x`, `/x`, `~/x`, `a/b/c`, `x.txt`. They get "file not found" at once
    instead of a hub lookup that retries for half a minute."""
    if source.startswith((".", "/", "~")) or "\\" in source:
        return True
    repo = source.partition(":")[0]
    return repo.count("/") > 1 or bool(Path(repo).suffix)


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line, text); decoding per line pins bad UTF-8 to its line."""
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} line {lineno}: not valid UTF-8 (bad byte at column "
                f"{exc.start + 1}); re-save the file as UTF-8"
            ) from exc
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                "each line must hold one complete JSON object"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(obj).__name__}; write "
                'one object per line, e.g. {"text": "...", "label": 0}'
            )
        yield where, obj


def _csv_layout(path: Path) -> tuple[list[str], list[int]]:
    """Header and first line of each record, exact even with quoted newlines."""
    text = "\n".join(line for _, line in _decoded_lines(path))
    reader = csv.reader(io.StringIO(text, newline=""))
    records, end = [], 0
    for record in reader:
        if record:
            records.append((end + 1, record))
        end = reader.line_num
    return (records[0][1] if records else []), [start for start, _ in records[1:]]


def _table_rows(path: Path, fmt: str, fields: list[str], required: str | None) -> list[Row]:
    import datasets

    kwargs: dict[str, Any] = {}
    lines: list[int] = []
    if fmt == "csv":
        header, lines = _csv_layout(path)  # also pins non-UTF-8 bytes to a line
        if not lines:
            _raise_empty(str(path))
        # Every cell a string, none NaN: "NA" stays text and "007" stays "007".
        kwargs["keep_default_na"] = False
        if all(header) and len(set(header)) == len(header):
            string = datasets.Value("string")
            kwargs["features"] = datasets.Features({c: string for c in header})
    elif _parquet_num_rows(path) == 0:  # datasets cannot build a split of zero rows
        _raise_empty(str(path))
    try:
        # a throw-away cache: nothing of the user's file is copied into ~/.cache/huggingface
        with tempfile.TemporaryDirectory(prefix="facsynth-load-") as cache:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train",
                                       cache_dir=cache, keep_in_memory=True, **kwargs)
    except Exception as exc:
        detail = exc.__cause__ or exc  # datasets wraps the parser's own message
        raise DataError(f"{path}: cannot read as {fmt} ({detail})") from exc
    if fmt == "parquet":
        wheres = [f"{path} row {n}" for n in range(1, len(ds) + 1)]
    else:
        if len(lines) != len(ds):  # the parsers disagree: assume one line per row
            lines = list(range(2, len(ds) + 2))
        wheres = [f"{path} line {n}" for n in lines]
    return _columns_to_rows(ds, wheres, fields, required)


def _parquet_num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:
        raise DataError(f"{path}: not a valid Parquet file ({exc})") from exc


def _hub_rows(source: str, fields: list[str], required: str | None) -> list[Row]:
    import datasets

    repo, _, split = source.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:
        raise DataError(
            f"{source}: no such local file, and Hugging Face dataset '{repo}' split "
            f"'{split}' failed to load ({exc}); check the path, id, split and network"
        ) from exc
    wheres = [f"{repo} (split {split}) row {n}" for n in range(1, len(ds) + 1)]
    return _columns_to_rows(ds, wheres, fields, required)


def _columns_to_rows(
    ds: Any, wheres: list[str], fields: list[str], required: str | None
) -> list[Row]:
    columns = list(ds.column_names)
    if wheres and required is not None and required not in columns:
        _raise_no_text(wheres[0], required, columns)
    wanted = [c for c in dict.fromkeys(fields) if c in columns]
    data = ds.select_columns(wanted).to_dict() if wheres else {}
    return [(w, {c: data[c][i] for c in wanted}) for i, w in enumerate(wheres)]


def _raise_no_text(where: str, field: str, present: Iterable[str]) -> NoReturn:
    raise DataError(
        f"{where}: no field '{field}' (fields present: {', '.join(present) or 'none'});"
        " add it, or name the text field with --text-field (text_field= in Python)"
    )


def _raise_empty(name: str) -> NoReturn:
    raise DataError(f"{name}: the dataset has no rows; add at least one text")


def _parse_label(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value)
    raise DataError(
        f"{where}: field '{field}' is {value!r}; use 0 or 1 "
        '(true/false and the strings "0"/"1" also work)'
    )


def _validate(
    rows: Iterable[Row],
    name: str,
    text_field: str,
    label_field: str | None,
    require_labels: bool,
) -> TextDataset:
    """Check every row; a label may be missing only when no row has one."""
    texts: list[str] = []
    labels: list[int] = []
    first_missing: str | None = None
    first_labelled: str | None = None
    for where, row in rows:
        if text_field not in row:
            _raise_no_text(where, text_field, row)
        text = row[text_field]
        if not isinstance(text, str) or not text.strip():
            what = f"{json_kind(text)}, not text"
            if text is None or isinstance(text, str):
                what = "empty or whitespace-only"
            raise DataError(
                f"{where}: field '{text_field}' is {what};"
                " put non-empty text there or remove the row"
            )
        texts.append(text)
        value = None if label_field is None else row.get(label_field)
        if value is None or value == "":
            first_missing = first_missing or where
            labels.append(0)
        else:
            first_labelled = first_labelled or where
            labels.append(_parse_label(value, where, str(label_field)))
    if not texts:
        _raise_empty(name)
    if first_missing and (first_labelled or require_labels):
        why = "labels are required"
        if first_labelled:
            why = f"other rows have one ({first_labelled})"
        raise DataError(
            f"{first_missing}: field '{label_field}' is missing but {why};"
            f" give every row a '{label_field}' of 0 or 1"
        )
    return TextDataset(texts, labels if first_labelled else None, name)


def _new_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 less the umask."""
    global _NEW_FILE_MODE
    if _NEW_FILE_MODE is None:
        mask: int | None = None
        try:  # Linux reports it; os.umask can only read it by setting it
            with open("/proc/self/status", encoding="ascii") as f:
                line = next((x for x in f if x.startswith("Umask:")), None)
            mask = int(line.split()[1], 8) if line else None
        except (OSError, ValueError):
            pass
        if mask is None:
            mask = os.umask(0o077)
            os.umask(mask)
        _NEW_FILE_MODE = 0o666 & ~mask
    return _NEW_FILE_MODE


_NEW_FILE_MODE: int | None = None


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    The temp file is made by `tempfile.mkstemp` in `path`'s folder (O_CREAT|O_EXCL, a random
    name), so nothing planted at a predictable temp name (a symlink, say) is ever followed;
    it is written, fsynced and `os.replace`d onto `path`. A symlink at `path` itself is
    replaced, not written through. The new file keeps the mode of the file it replaces (a
    new one gets the usual 0o666 less the umask, not mkstemp's 0o600).
    """
    import contextlib
    import stat
    import tempfile

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            old = path.lstat()
            mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else _new_file_mode()
        except FileNotFoundError:
            mode = _new_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FileAccessError(f"{path}: cannot write it ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # the temp file's name means nothing to the caller
            raise FileAccessError(f"{path}: cannot write it ({e.strerror or e}); the old "
                                  "file, if any, is unchanged") from e
        raise


def json_kind(value: Any) -> str:
    """What a JSON value is, as a person reads it: "a number", "a list", "true/false"."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def both_labels(data: TextDataset, flag: str, why: str) -> None:
    """DataError naming the file unless `data` has rows labelled 0 and rows labelled 1."""
    labels = list(data.labels or [])
    n1 = sum(1 for y in labels if y == 1)
    if n1 == 0 or n1 == len(labels):
        only = "1" if n1 else "0"
        raise DataError(f"{flag} {data.source}: all {len(labels)} rows are labelled {only}; "
                        f"it needs rows of both labels ({why})")
