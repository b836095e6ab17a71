"""Ray Data I/O of the probe: reading a pool's texts, hashing them, writing shard parts.

Every Ray task worker that reads, hashes or writes imports this module, so it stays
light (pyarrow and numpy; no torch): a cold worker is ready in a second, not ten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
import pyarrow as pa
from ray.data import Dataset, Datasink
from ray.data.block import Block, BlockAccessor

from tools.errors import ConfigError, DataError
from tools.shards import KEY_DTYPE, arrow_keys, write_part

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_pool(source: str, text_field: str, *, num_cpus: float,
              blocks: int | None = None) -> Dataset:
    """The pool's text column as a Ray Dataset: JSONL, CSV or Parquet by suffix (a local
    folder by its files' suffix), from a local path or any URI pyarrow reads."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import ray.data

    fmt = _FORMATS.get(PurePosixPath(source.split("?", 1)[0]).suffix.lower())
    if fmt is None and Path(source).is_dir():
        found = {_FORMATS.get(p.suffix.lower()) for p in Path(source).iterdir()} - {None}
        fmt = found.pop() if len(found) == 1 else None
    if fmt is None:
        raise ConfigError(f"{source}: the ray engine reads .jsonl, .json, .csv or .parquet "
                          "files (or a folder of one kind), local or any URI pyarrow reads")
    if "://" not in source and not Path(source).exists():
        raise DataError(f"{source}: file not found")
    common: dict[str, Any] = {"num_cpus": num_cpus, "override_num_blocks": blocks}
    if fmt == "json":
        parse = pajson.ParseOptions(explicit_schema=pa.schema([(text_field, pa.string())]),
                                    unexpected_field_behavior="ignore")
        return ray.data.read_json(source, parse_options=parse, **common)
    if fmt == "csv":  # every cell text: "NA" stays "NA", as in tools.data
        convert = pacsv.ConvertOptions(include_columns=[text_field], strings_can_be_null=False,
                                       column_types={text_field: pa.string()})
        return ray.data.read_csv(source, convert_options=convert, **common)
    return ray.data.read_parquet(source, columns=[text_field], **common)


def _keyed(batch: pa.Table, text_field: str) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """The batch's texts, their keys (memory.activation_cache.text_key) and which rows have
    a text at all (not missing, empty or whitespace-only; their keys are zeros)."""
    if text_field not in batch.column_names:
        raise DataError(f"the pool has no '{text_field}' column: pick it with --text-field")
    texts = batch.column(text_field).to_pylist()
    ok = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
    raw = b"".join(hashlib.sha256(t.encode("utf-8")).digest() if good else bytes(32)
                   for t, good in zip(texts, ok, strict=True))
    return texts, np.frombuffer(raw, dtype=KEY_DTYPE), ok


def _key_column(keys: np.ndarray, ok: np.ndarray | None = None) -> pa.Array:
    """binary(32) keys; null where `ok` is False."""
    valid = None if ok is None or ok.all() else pa.array(ok).buffers()[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(keys),
                                                [valid, pa.py_buffer(keys.tobytes())])


def hash_rows(batch: pa.Table, text_field: str) -> pa.Table:
    """map_batches UDF: each row's key (null: the row has no text)."""
    _, keys, ok = _keyed(batch, text_field)
    return pa.table({"key": _key_column(keys, ok)})


def todo_rows(batch: pa.Table, text_field: str, todo: np.ndarray) -> pa.Table:
    """map_batches UDF: (key, text) of the rows whose key is in `todo` (sorted), each key
    once per batch, shortest text first: the probe actors' calls then each get texts of
    about one length, which pad into forward batches with little waste even when a call
    is small (small calls keep the actors evenly busy to the end)."""
    texts, keys, ok = _keyed(batch, text_field)
    wanted = np.zeros(0, dtype=np.int64)
    if len(todo):
        pos = np.minimum(np.searchsorted(todo, keys), len(todo) - 1)
        wanted = np.flatnonzero((todo[pos] == keys) & ok)
    _, first = np.unique(keys[wanted], return_index=True)
    keep = wanted[first]
    keep = keep[np.argsort([len(texts[i]) for i in keep], kind="stable")]
    return pa.table({"key": _key_column(keys[keep]),
                     "text": pa.array([texts[i] for i in keep], pa.string())})


def pool_keys(source: str, text_field: str, *, num_cpus: float) -> np.ndarray:
    """[rows] keys of the pool in file order, repeats included (one Ray Data pass); a row
    without text is a DataError naming the first such row."""
    ds = read_pool(source, text_field, num_cpus=num_cpus)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(hash_rows,  # type: ignore[arg-type]  # text_field: fn_kwargs
                        batch_format="pyarrow", num_cpus=num_cpus,
                        fn_kwargs={"text_field": text_field})
    parts: list[np.ndarray] = []
    first_bad, n_bad, seen = -1, 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        column = cast(pa.Table, batch).column("key").combine_chunks()
        if column.null_count:
            bad = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
            first_bad = seen + int(bad[0]) if first_bad < 0 else first_bad
            n_bad += len(bad)
        elif not n_bad:
            parts.append(arrow_keys(column))
        seen += len(column)
    if n_bad:
        more = f" (and {n_bad - 1} more like it)" if n_bad > 1 else ""
        raise DataError(f"{source} row {first_bad + 1}: no text in '{text_field}' (missing, "
                        f"empty or whitespace-only){more}; remove them or pick --text-field")
    if not seen:
        raise DataError(f"{source}: no rows")
    return np.concatenate(parts)


def pool_texts(source: str, text_field: str, rows: np.ndarray, *,
               num_cpus: float) -> list[str]:
    """The texts of pool rows `rows` (0-based, file order as `pool_keys` numbers them), in
    that order: one streamed Ray Data pass that keeps only those rows' texts."""
    wanted = np.unique(np.asarray(rows, dtype=np.int64))
    got: dict[int, str] = {}
    ds = read_pool(source, text_field, num_cpus=num_cpus)
    ds.context.execution_options.preserve_order = True
    seen = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        table = cast(pa.Table, batch)
        lo, hi = np.searchsorted(wanted, [seen, seen + table.num_rows])
        if hi > lo:
            column = table.column(text_field)
            got.update((int(r), column[int(r) - seen].as_py()) for r in wanted[lo:hi])
        seen += table.num_rows
        if len(got) == len(wanted):
            break
    if len(got) < len(wanted):
        raise DataError(f"{source} has {seen} rows, not the {int(wanted[-1]) + 1} its shards "
                        "were keyed from: the file changed since it was probed")
    return [got[int(r)] for r in rows]


class ShardSink(Datasink[int]):
    """Each write task's rows as one part (tools.shards.write_part: whole or absent);
    Ray Data bundles at least `rows_per_shard` rows per task (the last one fewer)."""

    def __init__(self, parts_dir: Path, rows_per_shard: int) -> None:
        self.parts_dir, self.rows_per_shard = parts_dir, rows_per_shard

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks: Iterable[Block], ctx: Any) -> int:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks)
                  if t.num_rows]
        if not tables:
            return 0
        write_part(self.parts_dir, pa.concat_tables(tables))
        return sum(t.num_rows for t in tables)
