"""Tasks as plug-ins: each module here is one task (its rows, probe texts and contrast,
prompts, label-gate check, downstream model and metric; see `base.Task`).

Adding a task = one module + its prompt files + tests, and a line in `TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tools.data import TextDataset
from tools.errors import ConfigError
from tools.tasks.base import Contrast, Features, Task, workspace_features
from tools.tasks.options import (
    RewardOptions,
    SteeringOptions,
    TaskOptions,
    ToxicityOptions,
    check_options,
)
from tools.tasks.pairs import PairDataset
from tools.tasks.reward import BradleyTerryHead, PairSplit, RewardTask
from tools.tasks.steering import CaaVector, SteeringTask
from tools.tasks.toxicity import ToxicityTask

TASKS: dict[str, Callable[..., Task[Any, Any]]] = {
    ToxicityTask.name: ToxicityTask,
    RewardTask.name: RewardTask,
    SteeringTask.name: SteeringTask,
}
"""Task name -> its class; keyword options configure it (e.g. RewardTask(c=0.05))."""


OPTIONS: dict[str, type[TaskOptions]] = {
    ToxicityTask.name: ToxicityOptions,
    RewardTask.name: RewardOptions,
    SteeringTask.name: SteeringOptions,
}
"""Task name -> the model of its user-facing options (tools/tasks/options.py)."""


def get_task(name: str, **options: Any) -> Task[Any, Any]:
    """The task called `name`, built with `options` (checked by the task's options model:
    a ConfigError names a bad or unknown option, or the known tasks)."""
    make = TASKS.get(name)
    if make is None:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return make(**check_options(name, OPTIONS[name], options))


def probe_dataset(task: str, source: str | Path, *, fields: Mapping[str, str] | None = None,
                  require_labels: bool = False) -> TextDataset:
    """What coverage reads of a file of `task`'s rows: its texts, with the task's binary
    contrast as labels (a pair task: each pair's chosen side 1, its rejected side 0)."""
    t = get_task(task)
    return t.probe_texts(t.load(source, fields=fields, require_labels=require_labels)).dataset()


__all__ = [
    "TASKS", "BradleyTerryHead", "CaaVector", "Contrast", "Features", "PairDataset",
    "PairSplit", "RewardTask", "SteeringTask", "Task", "ToxicityTask", "get_task",
    "probe_dataset", "workspace_features",
]
