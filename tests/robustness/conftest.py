from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fakes import mean_residual, tiny_model, tiny_sae

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny random-weight model and an SAE on its layer 2, saved as local folders (what
    `--model` and `--sae` take)."""
    root = tmp_path_factory.mktemp("tiny")
    lm = tiny_model()
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    texts = [json.loads(x)["text"] for x in (EXAMPLES / "anchor.jsonl").read_text().splitlines()]
    center = mean_residual(lm, 2, texts[:40])
    tiny_sae(layer=2, d_sae=256, k=4, center=center).sae.save_model(root / "sae")
    return {"model": root / "model", "sae": root / "sae"}


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch working folder holding copies of the demo anchor.jsonl and seed.jsonl, as a
    user's would; FACSYNTH_* cleared and FACSYNTH_HOME a fresh folder beside it."""
    for name in ("anchor.jsonl", "seed.jsonl", "pool.jsonl"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    for key in [k for k in os.environ if k.startswith("FACSYNTH_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FACSYNTH_HOME", str(tmp_path.parent / f"{tmp_path.name}-home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path
