"""Parquet shards of a probed pool: read in chunks, and coverage streamed over them.

A shard set is a folder that `tools.ray_probe` fills:

    manifest.json    ShardManifest: the model, SAE, hook and probe settings (their
                     `tools.probe.cache_namespace`); shards of another one are refused
    parts/*.parquet  one row per probed text (SCHEMA); each file is written under a
                     `.tmp-` name and renamed when whole, so a killed probe leaves only
                     `.tmp-` files, which readers ignore and the next probe deletes

A row holds what coverage and the detector need of a text, never its per-token
activations: the text hash (`memory.activation_cache.text_key`), its token count, the
max activation of each active feature (the rule of `ProbeResult.max_matrix`) and the mean
residual (`ProbeResult.pooled`). A text that two read blocks both held may sit in two
parts; readers take one row per key. Nothing here loads the whole set: `iter_chunks`
streams record batches and `active_row_counts` keeps [d_sae] counters between them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, ValidationError

from memory.activation_cache import text_key
from tools.coverage import (
    ActivityRule,
    Coverage,
    GradedRule,
    JudgeSettings,
    activity,
    coverage,
    feature_thresholds,
)
from tools.data import write_text_atomic
from tools.errors import ConfigError, DataError

if TYPE_CHECKING:  # tools.probe imports torch
    from tools.probe import ProbeResult

KEY_DTYPE = np.dtype("S32")
"""Text keys as a numpy array: 32 raw bytes each, sortable. (Item access strips trailing
NUL bytes, so never turn one back into `bytes` by indexing; `key_bytes` does it right.)"""
MANIFEST = "manifest.json"
CHUNK_ROWS = 8192
SCHEMA = pa.schema([
    ("key", pa.binary(32)),
    ("n_tokens", pa.int32()),
    ("feat", pa.list_(pa.int32())),  # active features, ascending
    ("val", pa.list_(pa.float32())),  # their max activation over counted tokens
    ("pooled", pa.list_(pa.float32())),  # [d_model] mean residual over counted tokens
])


class ShardManifest(BaseModel):
    """What a shard set was probed with; `namespace` is `tools.probe.cache_namespace`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    namespace: str
    model: str
    sae: str
    hook: str
    probe: str
    d_sae: int
    d_model: int


@dataclass(frozen=True)
class Chunk:
    keys: np.ndarray  # [n] KEY_DTYPE
    max: sp.csr_matrix  # [n, d_sae] max activation per active feature
    pooled: np.ndarray | None  # [n, d_model] mean residual; None when not asked for


class ActiveCounts(NamedTuple):
    """What coverage needs of the data side: its row count and, per feature, the rows
    where the feature is active (`tools.coverage.active_rows` of the activity matrix)."""

    n_rows: int
    rows: np.ndarray  # [d_sae] int64


def key_array(keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
    """Text keys (32-byte hashes) as a KEY_DTYPE array."""
    if isinstance(keys, np.ndarray) and keys.dtype == KEY_DTYPE:
        return keys
    listed = list(keys)
    if any(len(k) != 32 for k in listed):
        raise ValueError("text keys are 32-byte SHA-256 digests (memory.activation_cache.text_key)")
    return np.array(listed, dtype=KEY_DTYPE) if listed else np.zeros(0, KEY_DTYPE)


def text_keys(texts: Iterable[str]) -> np.ndarray:
    return key_array([text_key(t) for t in texts])


def key_bytes(keys: np.ndarray) -> list[bytes]:
    raw = keys.tobytes()
    return [raw[i : i + 32] for i in range(0, len(raw), 32)]


def arrow_keys(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A binary(32) column as a KEY_DTYPE array (one copy, no Python objects)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise DataError("a shard row has no key: the shard is corrupt")
    data = arr.buffers()[1]
    if data is None:
        return np.zeros(0, KEY_DTYPE)
    return np.frombuffer(data, dtype=KEY_DTYPE, count=len(arr), offset=arr.offset * 32).copy()


def shard_table(
    keys: np.ndarray, n_tokens: np.ndarray, maxes: sp.csr_matrix, pooled: np.ndarray
) -> pa.Table:
    """Rows in SCHEMA from [n] keys, [n] token counts, [n, d_sae] maxes, [n, d_model] pooled."""
    m = sp.csr_matrix(maxes).sorted_indices()  # a copy: the caller's matrix stays as it is
    n, d_model = pooled.shape
    offsets = pa.array(m.indptr.astype(np.int32))
    key = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(32), n, [None, pa.py_buffer(key_array(keys).tobytes())])
    return pa.Table.from_arrays([
        key,
        pa.array(np.asarray(n_tokens, dtype=np.int32)),
        pa.ListArray.from_arrays(offsets, pa.array(m.indices.astype(np.int32))),
        pa.ListArray.from_arrays(offsets, pa.array(m.data.astype(np.float32))),
        pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d_model),
                                 pa.array(pooled.astype(np.float32).ravel())),
    ], schema=SCHEMA)


def write_part(parts_dir: Path, table: pa.Table) -> Path:
    """Write one part whole: a `.tmp-` file, fsynced, then renamed into place."""
    name = f"{uuid.uuid4().hex}.parquet"
    tmp, final = parts_dir / f".tmp-{name}", parts_dir / name
    try:
        with tmp.open("wb") as f:
            pq.write_table(table.cast(SCHEMA), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


class ShardSet:
    """A folder of shards (see the module doc). `open` reads an existing one; `create`
    starts one or reopens it for more rows (refusing a different model/SAE/settings)."""

    def __init__(self, root: Path, manifest: ShardManifest) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def open(cls, root: Path, expect: ShardManifest | None = None) -> ShardSet:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise DataError(f"{root}: not a shard set (no {MANIFEST}); probe the pool into it "
                            "first: facsynth probe --engine ray --shards DIR")
        try:
            found = ShardManifest.model_validate_json(path.read_text())
        except ValidationError as e:
            raise DataError(f"{path}: not a facsynth shard manifest ({e.errors()[0]['msg']})"
                            ) from None
        if expect is not None and found != expect:
            diff = [f"{k} {getattr(found, k)!r} (wanted {getattr(expect, k)!r})"
                    for k in ShardManifest.model_fields if getattr(found, k) != getattr(expect, k)]
            raise ConfigError(f"{root} holds shards of another probe: {'; '.join(diff)}; give "
                              "another --shards folder, or the model, SAE and settings it "
                              "was made with")
        return cls(Path(root), found)

    @classmethod
    def create(cls, root: Path, manifest: ShardManifest) -> ShardSet:
        """The shard set at `root` for `manifest`, made if absent; `.tmp-` files a killed
        probe left are deleted (one probe writes into a folder at a time)."""
        root = Path(root)
        if (root / MANIFEST).exists():
            shards = cls.open(root, expect=manifest)
        else:
            write_text_atomic(root / MANIFEST, manifest.model_dump_json(indent=2))
            shards = cls(root, manifest)
        shards.parts_dir.mkdir(parents=True, exist_ok=True)
        for stale in shards.parts_dir.glob(".tmp-*"):
            stale.unlink(missing_ok=True)
        return shards

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def files(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.glob("*.parquet") if not p.name.startswith("."))

    def n_stored(self) -> int:
        """Rows in all parts (a text stored twice counts twice; see `keys`)."""
        return sum(pq.read_metadata(f).num_rows for f in self.files())

    def keys(self) -> np.ndarray:
        """[n] sorted distinct text keys (KEY_DTYPE; reads only the key column)."""
        parts = [arrow_keys(pq.read_table(f, columns=["key"]).column("key"))
                 for f in self.files()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, KEY_DTYPE)

    def iter_chunks(
        self, keys: Iterable[bytes] | np.ndarray | None = None, *,
        chunk_rows: int = CHUNK_ROWS, pooled: bool = True,
    ) -> Iterator[Chunk]:
        """Chunks of at most `chunk_rows` rows, one row per distinct key (only `keys`
        when given; missing ones are simply not yielded), in storage order."""
        wanted = self.keys() if keys is None else np.unique(key_array(keys))
        seen = np.zeros(len(wanted), dtype=bool)
        files = self.files()
        if not files or not len(wanted):
            return
        columns = ["key", "feat", "val"] + (["pooled"] if pooled else [])
        scan = pads.dataset([str(f) for f in files], schema=SCHEMA, format="parquet")
        for batch in scan.to_batches(columns=columns, batch_size=chunk_rows,
                                     batch_readahead=0, fragment_readahead=0):
            k = arrow_keys(batch.column("key"))
            pos = np.minimum(np.searchsorted(wanted, k), len(wanted) - 1)
            candidates = np.flatnonzero((wanted[pos] == k) & ~seen[pos])
            _, first = np.unique(pos[candidates], return_index=True)  # a key twice in a batch
            take = np.sort(candidates[first])
            if not len(take):
                continue
            seen[pos[take]] = True
            rows = batch.take(pa.array(take))
            yield Chunk(k[take], self._csr(rows),
                        self._dense(rows) if pooled else None)

    def max_matrix(self, keys: Sequence[bytes] | np.ndarray) -> sp.csr_matrix:
        """[len(keys), d_sae] max activations of these texts, in this order."""
        return self._gather(keys, pooled=False)[0]

    def pooled(self, keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
        """[len(keys), d_model] mean residuals of these texts, in this order."""
        out = self._gather(keys, pooled=True)[1]
        assert out is not None
        return out

    def _gather(
        self, keys: Sequence[bytes] | np.ndarray, pooled: bool
    ) -> tuple[sp.csr_matrix, np.ndarray | None]:
        req = key_array(keys)
        uniq, inverse = np.unique(req, return_inverse=True)
        chunks = list(self.iter_chunks(uniq, pooled=pooled))
        found = (np.concatenate([np.searchsorted(uniq, c.keys) for c in chunks])
                 if chunks else np.zeros(0, dtype=np.int64))
        row_of = np.full(len(uniq), -1)
        row_of[found] = np.arange(len(found))
        rows = row_of[inverse]
        if (rows < 0).any():
            raise DataError(
                f"{int((rows < 0).sum())} of {len(req)} texts are not in the shards at "
                f"{self.root}: probe them first (facsynth probe --engine ray --shards "
                f"{self.root} DATA)")
        m = self.manifest
        maxes = (sp.vstack([c.max for c in chunks]).tocsr() if chunks
                 else sp.csr_matrix((0, m.d_sae), dtype=np.float32))
        dense = None
        if pooled:
            dense = (np.concatenate([c.pooled for c in chunks if c.pooled is not None])
                     if chunks else np.zeros((0, m.d_model), dtype=np.float32))[rows]
        return maxes[rows], dense

    def _csr(self, rows: pa.RecordBatch) -> sp.csr_matrix:
        feat, val = rows.column("feat"), rows.column("val")
        offsets = feat.offsets.to_numpy()
        indices = pc.list_flatten(feat).to_numpy()
        data = pc.list_flatten(val).to_numpy()
        if len(indices) != len(data):
            raise DataError(f"{self.root}: a shard row's feat and val differ in length")
        return sp.csr_matrix((data, indices, offsets - offsets[0]),
                             shape=(rows.num_rows, self.manifest.d_sae))

    def _dense(self, rows: pa.RecordBatch) -> np.ndarray:
        flat = pc.list_flatten(rows.column("pooled")).to_numpy()
        d = self.manifest.d_model
        if len(flat) != rows.num_rows * d:
            raise DataError(f"{self.root}: a shard row's pooled residual is not {d} long")
        return np.asarray(flat).reshape(rows.num_rows, d)


def active_row_counts(
    shards: ShardSet, thresholds: np.ndarray, rule: ActivityRule, *,
    keys: Iterable[bytes] | np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS,
) -> ActiveCounts:
    """Per feature, the data rows where it is active under `rule` (max over tokens >
    the feature's threshold), streamed chunk by chunk. `keys`: the data's rows as text
    keys, repeats included (a repeated text counts once per row, as in the local probe);
    None: every distinct text in the shards once."""
    if rule.pooling != "max":
        raise ConfigError("pooling=count needs per-token counts, which shards do not keep: "
                          "use pooling=max with the ray engine, or --engine local")
    d = shards.manifest.d_sae
    if thresholds.shape != (d,):
        raise ValueError(f"{thresholds.shape[0]} thresholds for {d} features")
    uniq, mult = (None, None) if keys is None else np.unique(key_array(keys), return_counts=True)
    counts = np.zeros(d, dtype=np.float64)  # integer-valued weights: exact below 2**53
    n_rows = n_found = 0
    for chunk in shards.iter_chunks(uniq, chunk_rows=chunk_rows, pooled=False):
        weight = (np.ones(len(chunk.keys)) if uniq is None or mult is None
                  else mult[np.searchsorted(uniq, chunk.keys)].astype(np.float64))
        m = chunk.max
        row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        on = m.data > thresholds[m.indices]
        counts += np.bincount(m.indices[on], weights=weight[row[on]], minlength=d)
        n_found += len(chunk.keys)
        n_rows += int(weight.sum())
    if uniq is not None and n_found < len(uniq):
        raise DataError(f"{len(uniq) - n_found} of {len(uniq)} distinct data texts are not in "
                        f"the shards at {shards.root}: probe the data into them first")
    return ActiveCounts(n_rows, counts.astype(np.int64))


def measure_shards(
    anchor_acts: ProbeResult, anchor_labels: Sequence[int] | None, shards: ShardSet,
    rule: ActivityRule, judge: JudgeSettings | None = None, graded: GradedRule | None = None,
    *, keys: Iterable[bytes] | np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS,
) -> Coverage:
    """`tools.coverage.measure` with the data side streamed over shards: thresholds and
    activity from the (local) anchor probe, the data's active-row counts chunk by chunk.
    Needs `coverage()` to take the data side as (n_rows, rows) (ActiveCounts)."""
    anchor_max = anchor_acts.max_matrix()
    thresholds = feature_thresholds(rule, anchor_max)
    anchor_active = activity(anchor_acts, rule, thresholds)
    counts = active_row_counts(shards, thresholds, rule, keys=keys, chunk_rows=chunk_rows)
    report, task = coverage(anchor_active, anchor_labels, counts, anchor_max=anchor_max,
                            rule=rule, judge=judge, graded=graded)
    if thresholds.size and np.all(thresholds == thresholds[0]):
        report.delta_used = float(thresholds[0])
    for array in (task, thresholds):
        array.setflags(write=False)
    return Coverage(report, task, thresholds, anchor_active)

