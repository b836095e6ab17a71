from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never see the developer's FACSYNTH_* variables, and FACSYNTH_HOME (converted
    models, activation cache, feature memory) is a fresh folder per test run: the embedded
    model is converted once per run, and nothing lands in the user's cache."""
    home = tmp_path_factory.mktemp("facsynth-home")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("FACSYNTH_")]:
            mp.delenv(key)
        mp.setenv("FACSYNTH_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_lm():  # type: ignore[no-untyped-def]
    from tests.fakes import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def tiny_sae():  # type: ignore[no-untyped-def]
    from tests.fakes import tiny_sae

    return tiny_sae()


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: tests on real data need ../shared/data beside the repo")
    return path


@pytest.fixture
def probed_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the batches that reach the model in `tools.probe` (cache misses)."""
    from tools import probe as probe_mod

    calls: list[int] = []
    real = probe_mod.probe_batch

    def counting(lm, saes, batch, sink):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return real(lm, saes, batch, sink)

    monkeypatch.setattr(probe_mod, "probe_batch", counting)
    return calls
