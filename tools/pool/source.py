"""The pool path's settings for an improve run (`RunConfig.pool`): the pool file, where its
rows' labels come from, how rows are picked, how many labels the run may ask for, and which
engine reads the pool (local: in memory through the activation cache; ray: probed on Ray
into shards, picks streamed over them, tools/pool/stream.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.pool.labels import Labeler
from tools.pool.select import SelectSettings
from tools.ray_cluster import BATCH_SIZE

Source = Literal["generate", "pool", "both"]
PoolEngine = Literal["local", "ray"]


class RayPool(BaseModel):
    """`--engine ray`: where the pool's shards go and how it is probed (as `facsynth probe
    --engine ray`), and how many rows each strategy keeps while streaming."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shards: str | None = Field(None, description="the shard folder (default FACSYNTH_HOME/"
                               "shards/<model+SAE+settings>/<hash of the pool's location>)")
    address: str | None = Field(None, description="the Ray cluster (default: RAY_ADDRESS, "
                                "else a single-node cluster on this machine)")
    concurrency: int | None = Field(None, ge=1, description="probe actors (default: one per "
                                    "GPU, else one per 4 CPUs)")
    batch_size: int = Field(BATCH_SIZE, ge=1, description="texts per probe actor call")
    candidates: int | None = Field(None, ge=1, description="rows each strategy keeps while "
                                   "streaming (default max(20 x batch, 500)); more is closer "
                                   "to the in-memory pick and costs memory")


class PoolSource(BaseModel):
    """`improve --pool FILE --source pool|both`: real rows picked for labelling."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str = Field(description="the pool file (JSONL, CSV or Parquet): rows with a text "
                      "column; a label column is read only by the file labeler")
    text_field: str = "text"
    label_field: str = Field("label", description="labeler file: the pool's label column")
    source: Source = Field("pool", description="pool: each round labels picked pool rows; "
                           "both: picks first, then synthesises only for the task features "
                           "with a deficit that no pool row fills")
    labeler: Labeler = Field("human", description="human: the run pauses for a person's "
                             "labels (facsynth label); file: the pool's own label column; "
                             "judge: the label gate's judges (disputed rows are dropped)")
    select: SelectSettings = Field(default_factory=SelectSettings)
    budget: int = Field(100, ge=1, description="pool rows labelled at most, all rounds")
    engine: PoolEngine = Field("local", description="local: the pool probed and picked from "
                               "in memory; ray: probed on Ray into shards, picks streamed "
                               "over them (pools of 10^5+ rows)")
    ray: RayPool = Field(default_factory=RayPool)
