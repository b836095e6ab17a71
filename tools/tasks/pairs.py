"""What the loop needs of any pair task (reward, steering): its rows are `PairDataset`s
(prompt, chosen, rejected), and a synthetic sample carries its pair in `Sample.fields` with
the pair's preferred side as `Sample.text` (the text the activation verifier probes).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tools.errors import DataError
from tools.tasks.reward import PairDataset
from tools.verify import Sample

KEYS = ("prompt", "chosen", "rejected")


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
                    text_of: Callable[[PairDataset], tuple[list[str], list[str]]]
                    ) -> Callable[[str], tuple[str, dict[str, str] | None]]:
    """A generator reply -> (probe text, pair fields): the task's `parse`, then its probe
    text of the preferred side; an unparseable reply -> ("", None), which the verifier
    rejects as empty."""

    def convert(reply: str) -> tuple[str, dict[str, str] | None]:
        row = parse(reply)
        if row is None:
            return "", None
        good, _ = text_of(PairDataset([row[0]], [row[1]], [row[2]], "reply"))
        return good[0], dict(zip(KEYS, row, strict=True))

    return convert


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """A model as `model.npz` + `model.json` in `folder`, each written to a temp file and
    renamed (a crash leaves the old model or none, never half of one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in (("model.npz", lambda f: np.savez(f, **arrays)),
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
