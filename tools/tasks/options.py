"""Each task's own options (`--task-option KEY=VALUE`, `task_options` in a run's config), as
one pydantic model per task: typed, bounded, and refused by name (`check_options`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tools.errors import ConfigError


class TaskOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ToxicityOptions(TaskOptions):
    """The toxicity task has no options of its own (its detector is --detector)."""


class RewardOptions(TaskOptions):
    prompt_chars: int = Field(600, ge=0, description="how much of the prompt (its end) the "
                              "probe and the head read before each response")
    c: float = Field(0.1, gt=0, description="inverse L2 strength of the head's regression")


class SteeringOptions(TaskOptions):
    layer: int | None = Field(None, ge=0, description="the decoder layer CAA reads and steers "
                              "(default: the model's middle layer)")
    multiplier: float = Field(1.0, description="the steering strength the metric uses")
    prompt_chars: int = Field(600, ge=0, description="how much of the question stem (its "
                              "end) the probe reads before each option")
    batch_size: int = Field(16, ge=1, description="prompts per forward pass")


def check_options(task: str, model: type[TaskOptions], values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` validated by the task's options `model` (only the keys given); a ConfigError
    naming each bad option, what it must be and what was given."""
    try:
        parsed = model.model_validate(dict(values))
    except ValidationError as e:
        known = ", ".join(model.model_fields) or "none"
        problems = []
        for err in e.errors():
            key = ".".join(map(str, err["loc"])) or "?"
            if err["type"] == "extra_forbidden":
                problems.append(f"--task-option {key}: the {task} task has no such option "
                                f"(its options: {known})")
            else:
                problems.append(f"--task-option {key}: {err['msg'].lower()} "
                                f"(got {err['input']!r})")
        raise ConfigError(f"task {task!r}: {'; '.join(problems)}") from None
    return parsed.model_dump(exclude_unset=True)
