from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "toxicity"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_lm():  # type: ignore[no-untyped-def]
    from tests.tiny import tiny_model

    return tiny_model()


@pytest.fixture(scope="session")
def tiny_sae():  # type: ignore[no-untyped-def]
    from tests.tiny import tiny_sae

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
