"""The task seam: what differs between the tasks facsynth makes data for.

A task owns its row schema (`load`, validated with file:line:field errors), the texts the
SAE probe reads from its rows and the binary contrast the label judge uses to find F_task
(`probe_texts`), its held-out split (`split`), its prompt files, how the label gate checks
a synthetic row's label or pair (`gate`), and its downstream model and metric (`fit`,
`metric`). The loop, coverage, memory, chat and MCP stay task-agnostic.

    task = get_task("reward")
    data = task.load("pairs.jsonl")
    contrast = task.probe_texts(data)          # texts + 0/1 labels: what coverage reads
    model = task.fit(data.subset(train_idx), features, seed=0)
    task.metric(model, data.subset(dev_idx), features)   # {"pairwise_accuracy": ..., ...}

`features` maps texts to frozen feature rows ([n, d]); `workspace_features(ws)` gives the
mean layer residual the probe stores (`ProbeResult.pooled()`), and tests pass a stand-in
(e.g. tests/fakes.bag_of_words) so they need no model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from tools.data import TextDataset
from tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tools.workspace import Workspace

Features = Callable[[Sequence[str]], np.ndarray]
"""texts -> [n, d] frozen features, one row per text (the same text, the same row)."""

D = TypeVar("D")
M = TypeVar("M")


@dataclass(frozen=True)
class Contrast:
    """The texts the SAE probe reads for a task's rows, with the binary contrast the label
    judge needs (1: toxic / chosen / matching; 0: harmless / rejected / not matching; None
    for unlabelled toxicity data). `rows[i]` is the data row text i came from."""

    texts: list[str]
    labels: list[int] | None
    rows: list[int]
    source: str
    paired: bool = False
    """texts come as (1, 0) pairs of one row each: the label judge compares within pairs"""

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.texts) or (
                self.labels is not None and len(self.labels) != len(self.texts)):
            raise ValueError("texts, labels and rows must be equally long")

    def dataset(self) -> TextDataset:
        """As the text + label dataset coverage and the probe read (`Workspace.measure`)."""
        return TextDataset(self.texts, self.labels, self.source, paired=self.paired)


class Task(Protocol[D, M]):
    """One kind of data and downstream model. `D` is the task's validated rows (with
    `subset`, `len` and `source`), `M` its fitted downstream model."""

    name: ClassVar[str]
    headline: ClassVar[str]
    """The key of `metric` that decides (higher is better)."""
    about: ClassVar[str]
    """One sentence for people and the chat agent: the rows, the model, the metric."""
    fields: ClassVar[tuple[str, ...]]
    """The schema's fields, in order; `load(fields={...})` renames them."""
    generate_prompt: ClassVar[str | None]
    """Prompt file (prompts/<name>.md) that asks for new rows; None: not written yet."""
    relevance_prompt: ClassVar[str]
    """Prompt file with the task guideline the LLM relevance judge reads."""

    def bind(self, ws: Any) -> Task[D, M]:
        """The task for a workspace (a task that runs the workspace's model keeps it)."""
        ...

    def load(self, source: str | Path, *, fields: Mapping[str, str] | None = None,
             require_labels: bool = False) -> D:
        """Validated rows from a file or hub id; a bad row is a DataError naming file,
        line and field."""
        ...

    def probe_texts(self, data: D) -> Contrast: ...

    def split(self, data: D, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rest, held_out) row indices, sorted; about `frac` held out, related rows
        (near-duplicates, one prompt's pairs) on one side."""
        ...

    def fit(self, train: D, features: Features, *, seed: int = 0,
            synthetic: Sequence[bool] | None = None,
            synthetic_share: float | None = None) -> M:
        """The downstream model; `synthetic` marks synthetic rows, which together get
        `synthetic_share` of the weight (tools/detector.py `row_weights`)."""
        ...

    def agreement(self, model: M, data: D, features: Features) -> np.ndarray:
        """[n] the model's probability that each row's claim holds (its label, or that
        chosen beats rejected)."""
        ...

    def gate(self, model: M, real: D, synthetic: D, features: Features,
             quantile: float = 0.25) -> np.ndarray:
        """[n_synthetic] bool: the label gate's model check of synthetic rows against real
        rows the model never trained on."""
        ...

    def metric(self, model: M, data: D, features: Features) -> dict[str, float]: ...


def check_fields(task: str, schema: Sequence[str],
                 given: Mapping[str, str] | None) -> dict[str, str]:
    """The column name of each schema field: itself unless `given` renames it."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigError(f"the {task} task has no field {', '.join(map(repr, unknown))}; "
                          f"its fields: {', '.join(schema)}")
    return {f: given.get(f, f) for f in schema}


def workspace_features(ws: Workspace) -> Features:
    """The mean layer residual over each text's counted tokens (through the activation
    cache): the frozen features the probe detector and the reward head read."""

    def features(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            raise DataError("no texts to compute features of")
        return ws.probe(TextDataset(list(texts), None, "task")).pooled()

    return features
