"""The tools' bounded parameter types (their input schemas), shared by every Toolbox part.

Chat and MCP publish the same schemas (agent/tool_registry.py); a value outside a bound is
refused by the method's `validate_call` before any work, and a run folder read back on
resume goes through the same bounds (agent/toolbox_runs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field

ProgressFn = Callable[[str, float, float | None], None]
"""progress(message, done, total)"""


def _path(description: str) -> Any:
    return Field(min_length=1, max_length=1024, description=description)


PathArg = Annotated[str, _path("a dataset file (JSONL, CSV or Parquet) in the workspace root")]
Anchor = Annotated[str, _path("the labelled anchor set (1 = harmful) that defines the task")]
Data = Annotated[str, _path("the dataset to measure against the anchor set")]
OutPath = Annotated[str, _path("the JSONL file kept rows go to (rejected ones beside it)")]
RunDir = Annotated[str, _path("the folder of the improve run, inside the workspace root")]
PoolPath = Annotated[str, _path("unlabelled rows to pick from (a text column; a label "
                                "column is read only with labeler='file')")]
LabelsPath = Annotated[str, _path("a filled-in to-label file (CSV or JSONL: row, label)")]
Limit = Annotated[int, Field(ge=1, le=200, description="how many to return")]
Top = Annotated[int, Field(ge=1, le=50, description="missing features to show or target")]
FeatureId = Annotated[int, Field(ge=0, le=10_000_000, description="an SAE feature id")]
FeatureList = Annotated[list[FeatureId], Field(min_length=1, max_length=50,
                                               description="SAE feature ids to generate for")]
PerFeature = Annotated[int, Field(ge=1, le=20, description="samples generated per feature")]
Rounds = Annotated[int, Field(ge=1, le=10, description="synthesis rounds at most")]
Budget = Annotated[int, Field(ge=1, le=5000, description="generated samples at most")]
LabelBudget = Annotated[int, Field(ge=1, le=5000, description="pool rows labelled at most, "
                                   "all rounds")]
Batch = Annotated[int, Field(ge=1, le=500, description="pool rows picked per round")]
Query = Annotated[str, Field(min_length=1, max_length=500, description="what to look for")]
K = Annotated[int, Field(ge=1, le=50, description="results")]
Examples = Annotated[int, Field(ge=0, le=10, description="example rows to show")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="sampling temperature")]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1,
                            description="random seed: the same seed repeats the sampling")]
Relevance = Annotated[Literal["label", "llm", "auto"], Field(
    description="which missing features to target: label (the anchor labels' judge), llm "
    "(the LLM must also judge them relevant) or auto")]
Resume = Annotated[bool, Field(description="continue the run already in run_dir")]
TaskName = Annotated[Literal["toxicity", "reward", "steering"], Field(
    description="what the rows are: toxicity (text + 0/1 label), reward (prompt, chosen, "
    "rejected preference pairs) or steering (A/B question, matching, not_matching)")]
Strategy = Annotated[Literal["fac", "random", "uncertainty", "top-score", "coreset"], Field(
    description="how pool rows are picked: fac (rows that fill the largest task-feature "
    "deficits), random, uncertainty (the model is least sure), top-score (the model scores "
    "them most positive) or coreset (farthest from what is labelled)")]
Labeler = Annotated[Literal["human", "file", "judge"], Field(
    description="who labels picked rows: human (the run pauses for a person: add_labels), "
    "file (the pool's own label column), judge (the label gate's judges; disputed rows "
    "are dropped)")]
JobId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9]+$",
                             description="a job id, as a long tool's answer gives it")]
Wait = Annotated[float, Field(ge=0, le=50, description="seconds to wait for the job to end "
                              "before answering (at most 50: under common client timeouts)")]
