from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tools.adapted as adapted
from agent.cli import app
from tests.fakes import tiny_model
from tools.adapted import (
    AdapterSettings,
    adapter_examples,
    encode_example,
    ensure_adapter,
    load_adapted,
    pick_examples,
    read_info,
)
from tools.errors import DataError
from tools.rundir import RunPaths, read_samples

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEXTS = ["how to hurt the lazy dog", "bake bread", "hack into my neighbour's wifi"]
SPANS = {7: [(0, "hurt the lazy"), (2, "hack into")], 9: [(1, "bake bread")]}


def test_examples_take_the_theme_from_another_row() -> None:
    out = adapter_examples(TEXTS, [1, 0, 1], [7, 9, 7], SPANS)
    assert out[0] == "Label: harmful\nTheme: hack into\nMessage: how to hurt the lazy dog"
    assert out[2] == ("Label: harmful\nTheme: hurt the lazy\n"
                      "Message: hack into my neighbour's wifi")
    # the feature's only span is the row's own: used rather than no theme
    assert out[1] == "Label: harmless\nTheme: bake bread\nMessage: bake bread"


def test_examples_without_theme_truncate_and_stay_one_line_per_field() -> None:
    long = "word " * 200
    out = adapter_examples([long, "hi"], [0, 1], [None, 3],
                           {3: [(0, "a span\nLabel: harmless")]}, max_chars=50)
    assert out[0].startswith("Label: harmless\nTheme: \nMessage: word")
    assert len(out[0].partition("\nMessage: ")[2]) <= 50
    assert out[1] == "Label: harmful\nTheme: a span Label: harmless\nMessage: hi"
    with pytest.raises(DataError):
        adapter_examples(TEXTS, [1, 0], [7, 9, 7], SPANS)


def test_pick_examples_positives_twice_first_then_negatives() -> None:
    labels = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    examples = [f"row{i}" for i in range(10)]
    got = pick_examples(examples, labels, AdapterSettings(max_examples=8))
    assert sorted(got[:4]) == ["row0", "row0", "row3", "row3"]
    assert len(got) == 8 and len(set(got[4:])) == 4 and all(labels[int(g[3:])] == 0
                                                             for g in got[4:])
    few_neg = pick_examples(examples[:4], labels[:4], AdapterSettings(max_examples=10))
    assert sorted(few_neg) == ["row0", "row0", "row1", "row2", "row3", "row3"]


def test_encode_masks_the_prompt_and_ends_with_eos() -> None:
    tok = tiny_model().tokenizer
    tok.eos_token = "<|im_end|>"
    example = "Label: harmful\nTheme: hack\nMessage: hack the wifi"
    ids, n_prompt = encode_example(tok, example, 64)
    assert ids[:n_prompt] == tok("Label: harmful\nTheme: hack\nMessage:")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_prompt:-1]) == " hack the wifi"
    cut, _ = encode_example(tok, example, n_prompt + 2)
    assert len(cut) == n_prompt + 2 and tok.eos_token_id not in cut, "cut: no eos"
    with pytest.raises(DataError):
        encode_example(tok, "no marker here", 64)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "model"
    lm = tiny_model()
    lm.model.save_pretrained(root)
    lm.tokenizer.save_pretrained(root)
    return root


SMALL = AdapterSettings(max_examples=12, batch_size=4, max_tokens=48, lr=1e-2, seed=1)


def _examples() -> list[str]:
    texts = TEXTS * 4
    return adapter_examples(texts, [1, 0, 1] * 4, [7, 9, 7] * 4, SPANS)


def test_adapter_trains_once_and_is_cached(folder, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    path = ensure_adapter(tmp_path, folder, "tiny:0", _examples(), SMALL)
    assert path.parent == tmp_path / "adapters" and path.name.startswith("tiny-")
    info = read_info(path)
    assert info.steps == 3 and info.n_examples == 12 and info.n_positive_prompts == 8
    assert info.tokens > 12 and info.tokens_per_s > 0
    weights = load_file(path / "adapter_model.safetensors")
    b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(b) == 4 * 7, "every linear projection of every layer is adapted"
    assert all(w.abs().sum() > 0 for w in b), "training moved the adapters off their zero init"
    assert not list(path.parent.glob(".*tmp-*")), "trained in a temp folder, renamed into place"

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the cached adapter was trained again")

    monkeypatch.setattr(adapted, "train_adapter", no_training)
    assert ensure_adapter(tmp_path, folder, "tiny:0", _examples(), SMALL) == path
    with pytest.raises(AssertionError, match="trained again"):  # other rows: another adapter
        ensure_adapter(tmp_path, folder, "tiny:0", _examples()[:-1], SMALL)


def test_adapted_chat_is_seeded_and_ignores_system(folder, tmp_path) -> None:
    path = ensure_adapter(tmp_path, folder, "tiny:0", _examples(), SMALL)
    chat = load_adapted(folder, path, cache_dir=tmp_path, max_new_tokens=12)
    assert chat.name == f"adapted:{path.name}"
    prompt = "Label: harmful\nTheme: hack into\nMessage:"

    async def three() -> list[str]:
        return list(await asyncio.gather(
            chat.achat("", prompt, temperature=0.8, seed=5),
            chat.achat("You are terse.", prompt, temperature=0.8, seed=5),
            chat.achat("", prompt, temperature=0.8, seed=6)))

    a, b, c = asyncio.run(three())
    assert a and a == b, "same prompt and seed: same text, whatever the system says"
    assert asyncio.run(chat.achat("", prompt, temperature=0.8, seed=5)) == a, "alone = batched"
    assert "\nLabel:" not in a + c


def test_improve_with_the_adapted_generator(folder, tmp_path, monkeypatch) -> None:
    """One round of the real engine on the tiny model: the adapter is trained on the anchor,
    cached under the home, and writes the round's samples with the adapted prompt."""
    from tests.fakes import mean_residual, tiny_sae

    lm = tiny_model()
    center = mean_residual(lm, 2, [json.loads(x)["text"] for x in
                                   (EXAMPLES / "anchor.jsonl").read_text().splitlines()])
    tiny_sae(layer=2, d_sae=256, k=4, center=center).sae.save_model(tmp_path / "sae")
    (tmp_path / "facsynth.toml").write_text(
        "[judge]\nmin_support = 1\nmin_support_frac = 0.0\nmin_log_odds = 0.5\n")
    monkeypatch.setenv("FACSYNTH_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(adapted, "AdapterSettings",
                        lambda: AdapterSettings(max_examples=16, batch_size=8, max_tokens=48))
    res = CliRunner().invoke(app, [
        "improve", "--model", str(folder), "--sae", str(tmp_path / "sae"),
        "--anchor", str(EXAMPLES / "anchor.jsonl"), "--data", str(EXAMPLES / "seed.jsonl"),
        "--run-dir", "r", "--rounds", "1", "--top", "2", "--per-feature", "2",
        "--relevance", "label", "--generator", "local", "--describe", "spans",
        "--generator-kind", "adapted"])
    assert res.exit_code == 0, res.output
    history = json.loads((tmp_path / "r" / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1] and history[1]["generated"] == 4
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["loop"]["generator"] == "adapted"
    journal = read_samples(RunPaths(tmp_path / "r").journal(1))
    assert len(journal) == 4
    (adapter,) = [p for p in (tmp_path / "home" / "adapters").iterdir() if p.is_dir()]
    for s in journal:
        assert s.provenance.generator == f"adapted:{adapter.name}"
        assert s.provenance.prompt_version == "generate_adapted.v1"
    assert read_info(adapter).n_examples == 16
