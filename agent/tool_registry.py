"""The facsynth tools, declared once: `TOOLS`, from which both the chat agent's LangChain tools
(agent/chat.py) and the MCP server's tools (agent/mcp_server.py) are generated.

A tool is a `Toolbox` method (agent/toolbox.py). From it come:

- `args`: one pydantic model of its parameters (the bounded Annotated types there), with
  `extra="forbid"`, so an unknown argument is refused naming it and the JSON schema says
  `additionalProperties: false`. Chat and MCP both publish this model's schema.
- `description`: its docstring (paragraphs on one line each; the first is the summary).
- `result`: its return annotation, a model in agent/results.py.
- `progress`: whether it takes a `progress` callback (coverage, generate_and_verify, improve).

and `TOOLS` adds `writes` (it writes files besides the state folder: the MCP annotation) and
`confirm` (the chat asks the user first, showing the estimated samples and time).

`ToolSpec.run` is the one way both adapters call a tool. It reports a bad argument caught by
the method's own `validate_call` as UsageError and a failed file access (OSError: permission
denied, a full disk) as FileAccessError. Anything else that is no FacsynthError is a bug: the
adapters log its traceback and answer with `internal_error(...)`, never blaming the caller.
"""

from __future__ import annotations

import contextlib
import inspect
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, model_validator
from pydantic_core import PydanticCustomError

from agent.llm import GEN_SECONDS, INTERPRET_SECONDS, ROUND_SECONDS, VLLM_START_SECONDS
from agent.results import Estimate
from agent.toolbox import ProgressFn, Toolbox
from tools.errors import FileAccessError, UsageError


class ToolArgs(BaseModel):
    """Base of every tool's argument model: unknown arguments are an error naming them."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def reject_unknown_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise PydanticCustomError(
                    "unknown_argument",
                    "unknown argument{s} {unknown}: this tool takes {known}",
                    {"s": "s" if len(unknown) > 1 else "", "unknown": ", ".join(unknown),
                     "known": ", ".join(known)})
        return data


class Confirmation(NamedTuple):
    """What the chat asks before a long tool runs, and answers when the user declines."""

    question: str
    estimate: Estimate
    declined: str


Confirm = Callable[[Toolbox, dict[str, Any]], Confirmation]


@dataclass(frozen=True)
class ToolSpec:
    """One tool: a Toolbox method and what the adapters need to know about it."""

    name: str
    description: str
    args: type[ToolArgs]
    result: type[BaseModel]
    method: Callable[..., BaseModel]
    progress: bool
    writes: bool = False
    confirm: Confirm | None = None

    def arguments(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """`given` validated, defaults filled in (ValidationError on bad arguments)."""
        parsed = self.args.model_validate(dict(given))
        return {name: getattr(parsed, name) for name in type(parsed).model_fields}

    def run(self, box: Toolbox, args: Mapping[str, Any],
            progress: ProgressFn | None = None) -> BaseModel:
        """The tool on validated `args` (see `arguments`); errors as in the module doc."""
        extra = {"progress": progress} if self.progress else {}
        with translated():
            return self.method(box, **args, **extra)

    def ask(self, box: Toolbox, args: dict[str, Any]) -> Confirmation | None:
        """The confirmation to ask for before running, or None when the tool needs none."""
        if self.confirm is None:
            return None
        with translated():
            return self.confirm(box, args)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Bad arguments caught by a Toolbox method's `validate_call` -> UsageError; a failed
    file access -> FileAccessError. Other exceptions pass unchanged."""
    try:
        yield
    except ValidationError as e:
        owner, _, name = e.title.rpartition(".")
        if owner not in TOOL_CLASSES or name not in TOOL_NAMES:
            raise  # a model inside the pipeline failed: a bug, not the caller's arguments
        raise UsageError(bad_arguments(name, e)) from e
    except OSError as e:
        raise FileAccessError(f"cannot access a file: {type(e).__name__}: {e}") from e
    except sqlite3.Error as e:  # a run's checkpoints or a cache on a full or broken disk
        raise FileAccessError(f"cannot use a database file: {e}") from e


def bad_arguments(tool: str, e: ValidationError) -> str:
    """A validation error of `tool`'s arguments as one line: `field: problem; ...`."""
    problems = "; ".join(
        f"{'.'.join(map(str, err['loc']))}: {err['msg']}" if err["loc"] else err["msg"]
        for err in e.errors())
    return f"invalid arguments to {tool}: {problems}"


def internal_error(tool: str, e: BaseException) -> str:
    """What the caller is told about an unexpected exception (its traceback is logged)."""
    return (f"internal error in {tool}: {type(e).__name__}: {e}; this is a facsynth bug, "
            "see the server log")


def tool(method: Callable[..., BaseModel], *, writes: bool = False,
         confirm: Confirm | None = None) -> ToolSpec:
    """The ToolSpec of a Toolbox method; see the module doc."""
    hints = get_type_hints(method, include_extras=True)
    params = [p for p in inspect.signature(method).parameters.values()
              if p.name not in ("self", "progress")]
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is inspect.Parameter.empty else p.default)
        for p in params}
    name = method.__name__
    args = create_model(f"{name}Arguments", __base__=ToolArgs, __module__=__name__, **fields)
    doc = inspect.getdoc(method) or name
    description = "\n".join(" ".join(par.split()) for par in doc.split("\n\n"))
    return ToolSpec(name=name, description=description, args=args, result=hints["return"],
                    method=method, progress="progress" in inspect.signature(method).parameters,
                    writes=writes, confirm=confirm)


# -- confirmations: the estimated samples and time of the long tools --------------------------


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def estimate_generation(box: Toolbox, features: list[int], per_feature: int) -> Estimate:
    """What generate_and_verify will cost: samples and rough wall time."""
    backend = box.backend()
    n = len(set(features)) * per_feature
    seconds = (n * GEN_SECONDS.get(backend, 1.0)
               + len(set(features)) * INTERPRET_SECONDS.get(backend, 2.0)
               + 0.05 * n + 5)  # the verification probe
    if backend == "vllm" and not box.llm_ready:
        seconds += VLLM_START_SECONDS
    return Estimate(samples=n, seconds=round(seconds), backend=backend,
                    note="rough: depends on the backend, the machine and the features")


def estimate_improve(box: Toolbox, rounds: int, budget: int, top: int,
                     per_feature: int) -> Estimate:
    """What improve will cost at most: samples and rough wall time."""
    backend = box.backend()
    n = min(budget, rounds * top * per_feature)
    seconds = (n * GEN_SECONDS.get(backend, 1.0) + rounds * top * INTERPRET_SECONDS.get(
        backend, 2.0) + (rounds + 1) * ROUND_SECONDS)
    if backend == "vllm" and not box.llm_ready:
        seconds += VLLM_START_SECONDS
    return Estimate(samples=n, seconds=round(seconds), backend=backend,
                    note="at most: the run stops early when FAC stops improving")


def _confirm_generation(box: Toolbox, a: dict[str, Any]) -> Confirmation:
    for path in (a["anchor"], a["data"]):  # fail before asking, not after
        box.sandbox.resolve(path, must_exist=True)
    box.sandbox.resolve(a["out"])
    est = estimate_generation(box, a["features"], a["per_feature"])
    return Confirmation(
        f"Generate {est.samples} samples for {len(set(a['features']))} features into "
        f"{a['out']} (about {duration(est.seconds)} on {est.backend})?", est,
        "the user declined; nothing was generated. Ask what to change (fewer features or "
        "samples).")


def _confirm_improve(box: Toolbox, a: dict[str, Any]) -> Confirmation:
    if not a["resume"]:
        for path in (a["anchor"], a["data"]):
            box.sandbox.resolve(path, must_exist=True)
    box.sandbox.resolve(a["run_dir"])
    est = estimate_improve(box, a["rounds"], a["budget"], a["top"], a["per_feature"])
    return Confirmation(
        f"Run {a['rounds']} improve round(s) in {a['run_dir']}: up to {est.samples} samples, "
        f"about {duration(est.seconds)} on {est.backend}?", est,
        "the user declined; no run was started.")


TOOLS: tuple[ToolSpec, ...] = (
    tool(Toolbox.describe_dataset),
    tool(Toolbox.coverage),
    tool(Toolbox.missing_features),
    tool(Toolbox.search_features),
    tool(Toolbox.explain_feature),
    tool(Toolbox.generate_and_verify, writes=True, confirm=_confirm_generation),
    tool(Toolbox.improve, writes=True, confirm=_confirm_improve),
    tool(Toolbox.report, writes=True),
    tool(Toolbox.job_status),
    tool(Toolbox.job_result),
    tool(Toolbox.cancel_job, writes=True),
    tool(Toolbox.list_jobs),
    tool(Toolbox.select_rows, writes=True),
    tool(Toolbox.add_labels, writes=True),
)
"""Every tool, in the order the system prompt and the tool lists show them."""
TOOL_NAMES = frozenset(t.name for t in TOOLS)
TOOL_CLASSES = frozenset(c.__name__ for c in Toolbox.__mro__)
"""Where the tools' `validate_call` errors come from (their titles name the class)."""
