"""The pool path's settings for an improve run (`RunConfig.pool`): the pool file, where its
rows' labels come from, how rows are picked, and how many labels the run may ask for."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.pool.labels import Labeler
from tools.pool.select import SelectSettings

Source = Literal["generate", "pool", "both"]


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
