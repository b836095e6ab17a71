"""The ray engine with the embedded model and shipped SAE (the defaults, as a user runs it):
the shards hold the local probe's max activations and pooled residuals, up to fp32 order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tolerance import assert_close_fp32, path_reduction
from tools.data import load_texts
from tools.errors import ConfigError
from tools.probe import probe_texts
from tools.settings import Settings
from tools.shards import text_keys
from tools.workspace import Workspace

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~80 s: a cluster, the 135M model
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_embedded_ray_probe_equals_the_local_probe(tmp_path: Path) -> None:
    from tools.ray_cluster import ray_cluster
    from tools.ray_probe import ray_probe

    texts = list(dict.fromkeys(load_texts(EXAMPLES / "pool.jsonl", label_field=None).texts))[:24]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    settings = Settings(home=tmp_path / "home")
    ws = Workspace(settings)
    local = probe_texts(texts, ws.model, ws.sae, settings.probe_settings())
    try:
        with ray_cluster():
            run = ray_probe(pool, settings=settings, out_dir=tmp_path / "shards",
                            concurrency=1, batch_size=16)
    except ConfigError as e:
        pytest.skip(f"Ray cannot start a cluster on this machine: {e}")
    keys = text_keys(texts)
    layers = ws.sae.hook.layer + 1
    config = ws.model.model.config
    assert_close_fp32(run.shards.max_matrix(keys).toarray(), local.max_matrix().toarray(),
                      path_reduction(config, layers, [ws.sae.d_in]))
    assert_close_fp32(run.shards.pooled(keys), local.pooled(),
                      path_reduction(config, layers, [settings.max_tokens]))
