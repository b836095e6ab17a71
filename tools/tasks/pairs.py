"""What the loop needs of any pair task (reward, steering): its rows are `PairDataset`s
(prompt, chosen, rejected), and a synthetic sample carries its pair in `Sample.fields` with
the pair's preferred side as `Sample.text` (the text the activation verifier probes).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tools.data import json_kind
from tools.errors import ConfigError, DataError
from tools.verify import Sample

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairDataset:
    """Validated preference pairs: `chosen[i]` is preferred to `rejected[i]` as a
    response to `prompts[i]`."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    source: str

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.chosen) == len(self.rejected):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.chosen)} chosen and "
                             f"{len(self.rejected)} rejected responses")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Iterable[int]) -> PairDataset:
        """The pairs at `indices`, in that order."""
        idx = list(indices)
        return PairDataset([self.prompts[i] for i in idx], [self.chosen[i] for i in idx],
                           [self.rejected[i] for i in idx], self.source)


def pair_weights(n: int, synthetic: Sequence[bool] | None, share: float | None) -> np.ndarray:
    """[n] training weight per pair, summing to the number of real pairs (all ones without
    a share, or when the pairs are all real or all synthetic)."""
    if synthetic is not None and len(synthetic) != n:
        raise DataError(f"{len(synthetic)} synthetic flags for {n} training pairs")
    w = np.ones(n, dtype=np.float64)
    if share is None or synthetic is None:
        return w
    if not 0 <= share < 1:
        raise ConfigError(f"synthetic_share must be in [0, 1), got {share}")
    fake = np.asarray(synthetic, dtype=bool)
    if fake.all() or not fake.any():
        return w
    real = float((~fake).sum())
    w[~fake] = 1 - share
    w[fake] = real * share / fake.sum()
    return w


def pairs_of(samples: Sequence[Sample], source: str = "synthetic") -> PairDataset:
    """The pairs the samples carry (in order); a sample without one is a DataError."""
    rows = []
    for s in samples:
        if not s.fields or any(k not in s.fields for k in KEYS):
            raise DataError(f"{source}: a sample for feature {s.provenance.feature} carries no "
                            "(prompt, chosen, rejected) pair; it was written for a text task")
        rows.append(tuple(s.fields[k] for k in KEYS))
    return PairDataset([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], source)


def extend(data: PairDataset, samples: Sequence[Sample]) -> PairDataset:
    """`data`'s pairs followed by the samples' pairs."""
    more = pairs_of(samples, data.source)
    return PairDataset(data.prompts + more.prompts, data.chosen + more.chosen,
                       data.rejected + more.rejected, data.source)


def reply_to_sample(parse: Callable[[str], tuple[str, str, str] | None],
                    probe: Callable[[PairDataset], Any]
                    ) -> Callable[[str], tuple[str, dict[str, str] | None]]:
    """A generator reply -> (probe text, pair fields): the task's `parse`, then the probe
    text of the pair's preferred side (the first of its `probe_texts`); an unparseable
    reply -> ("", None), which the verifier rejects as empty."""

    def convert(reply: str) -> tuple[str, dict[str, str] | None]:
        row = parse(reply)
        if row is None:
            return "", None
        texts = probe(PairDataset([row[0]], [row[1]], [row[2]], "reply")).texts
        return texts[0], dict(zip(KEYS, row, strict=True))

    return convert


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A model as `model.npz` + `model.json` in `folder`, each written to a temp file and
    renamed (a crash leaves the old model or none, never half of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (("model.npz", lambda f: np.savez(f, **arrays)),  # type: ignore[arg-type]
                        ("model.json", lambda f: f.write(json.dumps(meta).encode()))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_arrays(folder: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What `save_arrays` wrote; a missing or unreadable file is a DataError naming it."""
    try:
        with np.load(folder / "model.npz") as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
        meta = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: not a saved {what} ({e}); re-run the loop to retrain "
                        "it") from None
    return arrays, meta


class PairTask:
    """What pair tasks (reward, steering) share on top of their own `texts`, `parse`,
    `format_row` and `agreement`: growing a dataset by samples, showing pairs as examples,
    reading a generated pair back, and a model's view of unlabelled pairs' direction."""

    def extend(self, data: PairDataset, samples: Sequence[Sample]) -> PairDataset:
        return extend(data, samples)

    system: ClassVar[str] = ("You write realistic training examples for AI assistants, in the "
                             "layout asked for.")
    """The system message of generation requests."""

    reply_prompt: ClassVar[str]
    """The prompt for each reply of a staged pair (`StagedWriter`)."""

    def writer(self, llm: Any, data: PairDataset | None = None) -> Any:
        """The client that writes whole pairs, in three requests (`StagedWriter`): a small
        model cannot keep a three-part layout (SmolLM2-135M wrote the reward layout 3 times
        in 160 tries, and 0 steering questions in 42), so the generation prompt asks for the
        message or question only, then `reply_prompt` for each reply, shown one of `data`'s
        pairs when the task has `demos`."""
        return StagedWriter(llm, self, self.reply_prompt,
                            [] if data is None else self.demos(data))

    def demos(self, data: PairDataset) -> list[dict[str, str]]:
        """Real pairs as variables of `reply_prompt` (none: the reply prompt says it all)."""
        return []

    def read_reply(self, reply: str) -> tuple[str, dict[str, str] | None]:
        """A generated reply as (probe text, pair fields); ("", None) when unparseable."""
        return reply_to_sample(self.parse, self.probe_texts)(reply)  # type: ignore[attr-defined]

    def pseudo_label(self, model: Any, data: PairDataset, features: Any,
                     keep: Iterable[int]) -> PairDataset:
        """`data` with each pair directed as `model` prefers it (swapped where it prefers the
        rejected side), except the `keep` rows, whose direction is known."""
        agree = np.asarray(self.agreement(model, data, features))  # type: ignore[attr-defined]
        flip = agree < 0.5
        flip[list(keep)] = False
        return PairDataset(
            list(data.prompts),
            [r if f else c for c, r, f in zip(data.chosen, data.rejected, flip, strict=True)],
            [c if f else r for c, r, f in zip(data.chosen, data.rejected, flip, strict=True)],
            data.source)


class StagedWriter:
    """An async chat client that writes a whole pair in three requests: the caller's prompt
    gives the person's message (or question), then `reply_prompt`, rendered with the message,
    good=True/False and one of `demos` (chosen by the request seed; a dict of prompt
    variables), gives the preferred and the rejected reply. `task.assemble(message, good,
    bad, seed)` puts them in the task's `format_row` layout, so the task's parser reads it
    like any reply; an empty message or reply, or two equal replies, give "" (rejected as
    empty)."""

    SYSTEM_REPLY = "You write replies of AI assistants for a training dataset, as asked."

    def __init__(self, llm: Any, task: Any, reply_prompt: str,
                 demos: Sequence[dict[str, str]] = ()) -> None:
        self.llm, self.task, self.reply_prompt = llm, task, reply_prompt
        self.demos = list(demos)
        self.name = f"{llm.name}+staged"

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        from prompts import render
        from tools.generate import clean

        message = clean(await self.llm.achat(system, user, temperature=temperature, seed=seed))
        if not message:
            return ""
        demo = self.demos[seed % len(self.demos)] if self.demos else {}
        replies = []
        for k, good in enumerate((True, False), start=1):
            ask = render(self.reply_prompt, message=message, good=good, **demo)
            replies.append(clean(await self.llm.achat(
                self.SYSTEM_REPLY, ask, temperature=temperature, seed=(seed + k) % 2**52)))
        if not all(replies) or replies[0] == replies[1]:
            return ""
        return str(self.task.assemble(message, replies[0], replies[1], seed))


def row_text(where: str, row: Mapping[str, Any], name: str, fields: Sequence[str], *,
             blank: bool = False) -> str:
    """The row's string field `name` (a pair row needs `fields`); empty or whitespace-only
    only when `blank`. A missing or wrong field is a DataError naming the file, line and
    field, and how to rename columns (--field)."""
    if name not in row:
        raise DataError(f"{where}: no field '{name}' (fields present: "
                        f"{', '.join(row) or 'none'}); a pair needs {', '.join(fields)} "
                        f"(rename a column with --field, e.g. --field {fields[0]}=COLUMN)")
    value = row[name]
    if isinstance(value, str) and (blank or value.strip()):
        return value
    if value is None:
        what = "null"
    elif isinstance(value, str):
        what = "empty or whitespace-only"
    else:
        what = f"{json_kind(value)}, not text"
    text = "text (blank is allowed)" if blank else "non-empty text"
    raise DataError(f"{where}: field '{name}' is {what}; put {text} there or remove the row")
