"""tools.data: every format loads, and every bad input names file, line and field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tools.data import TextDataset, load_texts
from tools.errors import DataError


@pytest.fixture(autouse=True)
def _hermetic_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the datasets cache inside tmp_path and the hub unreachable."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write dicts as JSON and strings verbatim, one per line."""
    text = "\n".join(
        line if isinstance(line, str) else json.dumps(line) for line in lines
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def load_error(source: str | Path, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_texts(source, **kwargs)
    return str(info.value)


# --- loading ---


def test_jsonl_loads_texts_and_labels(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    )
    ds = load_texts(path)
    assert ds.texts == ["a", "b"]
    assert ds.labels == [1, 0]
    assert ds.source == str(path)


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", ["", '{"text": "a", "label": 1}', "   ", ""]
    )
    assert load_texts(path).texts == ["a"]


def test_jsonl_utf8_bom_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 1}\n')
    assert load_texts(path).texts == ["a"]


def test_json_suffix_is_read_as_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", [{"text": "a", "label": 0}])
    assert load_texts(path).labels == [0]


def test_accepted_label_spellings(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": v} for v in (0, 1, True, False, "0", "1")]
    assert load_texts(write_jsonl(tmp_path / "d.jsonl", rows)).labels == [
        0,
        1,
        1,
        0,
        0,
        1,
    ]


def test_csv_loads(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "text,label\nhello,1\nworld,0\n")
    ds = load_texts(path)
    assert ds.texts == ["hello", "world"]
    assert ds.labels == [1, 0]


def test_csv_keeps_na_like_and_numeric_text_as_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", 'text,label\nNA,1\n007,0\n"two\nlines",1\n')
    assert load_texts(path).texts == ["NA", "007", "two\nlines"]


def test_parquet_loads(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "d.parquet", {"text": ["a", "b", "c"], "label": [0, 1, 1]}
    )
    ds = load_texts(path)
    assert ds.texts == ["a", "b", "c"]
    assert ds.labels == [0, 1, 1]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_custom_field_names(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"comment": "x", "toxic": 1, "text": "ignored"}])
    elif fmt == "csv":
        write_csv(path, "comment,toxic,text\nx,1,ignored\n")
    else:
        write_parquet(path, {"comment": ["x"], "toxic": [1], "text": ["ignored"]})
    ds = load_texts(path, text_field="comment", label_field="toxic")
    assert ds.texts == ["x"]
    assert ds.labels == [1]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_unlabelled_data_gives_labels_none(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"text": "a"}, {"text": "b"}])
    elif fmt == "csv":
        write_csv(path, "text\na\nb\n")
    else:
        write_parquet(path, {"text": ["a", "b"]})
    ds = load_texts(path)
    assert ds.texts == ["a", "b"]
    assert ds.labels is None
    assert ds.n_positive == 0


def test_label_field_none_ignores_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "toxic"}])
    assert load_texts(path, label_field=None).labels is None


def test_hub_id_uses_default_train_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> datasets.Dataset:
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_texts("someone/toxic-set")
    assert calls == [(("someone/toxic-set",), {"split": "train"})]
    assert ds.texts == ["a", "b"]
    assert ds.labels == [1, 0]
    assert ds.source == "someone/toxic-set"


def test_hub_id_with_split(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        seen.update(path=path, split=split)
        return datasets.Dataset.from_dict({"sentence": ["a"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_texts("someone/set:validation", text_field="sentence")
    assert seen == {"path": "someone/set", "split": "validation"}
    assert ds.texts == ["a"]
    assert ds.labels is None


def test_hub_load_failure_is_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        raise FileNotFoundError("no such dataset")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    msg = load_error("someone/missing:test")
    assert "someone/missing" in msg
    assert "'test'" in msg
    assert "no such dataset" in msg


def test_hub_row_errors_name_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    msg = load_error("someone/set")
    assert "someone/set" in msg
    assert "row 2" in msg
    assert "'label'" in msg


# --- TextDataset ---


def test_text_dataset_len_positive_and_subset() -> None:
    ds = TextDataset(["a", "b", "c"], [1, 0, 1], "src")
    assert len(ds) == 3
    assert ds.n_positive == 2
    sub = ds.subset([2, 1])
    assert sub == TextDataset(["c", "b"], [1, 0], "src")


def test_text_dataset_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        TextDataset(["a", "b"], [1], "src")


def test_text_dataset_subset_unlabelled() -> None:
    assert TextDataset(["a", "b"], None, "src").subset([1]).labels is None


def test_text_dataset_is_frozen() -> None:
    ds = TextDataset(["a"], [1], "src")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.texts = []  # type: ignore[misc]


# --- errors ---


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet"])
def test_file_not_found(tmp_path: Path, name: str) -> None:
    msg = load_error(tmp_path / name)
    assert name in msg
    assert "not found" in msg


def test_directory_is_rejected(tmp_path: Path) -> None:
    assert "directory" in load_error(tmp_path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    msg = load_error(path)
    assert "d.txt" in msg
    assert ".jsonl" in msg


def test_jsonl_non_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "caf\xe9"}\n')
    msg = load_error(path)
    assert "d.jsonl line 3" in msg
    assert "UTF-8" in msg


def test_csv_non_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
    msg = load_error(path)
    assert "d.csv line 3" in msg
    assert "UTF-8" in msg


def test_malformed_json_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '{"text": "b",'])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "malformed JSON" in msg


def test_json_line_not_an_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, '["b", 1]'])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "list" in msg
    assert "object" in msg


def test_jsonl_missing_text_field_lists_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b", "label": 1}])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "'text'" in msg
    assert "body, label" in msg


def test_missing_custom_text_field_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    msg = load_error(path, text_field="comment")
    assert "'comment'" in msg
    assert "fields present: text" in msg


def test_csv_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "body,label\nx,1\n")
    msg = load_error(path)
    assert "d.csv line 2" in msg
    assert "'text'" in msg
    assert "body, label" in msg


def test_parquet_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"body": ["x"], "label": [1]})
    msg = load_error(path)
    assert "d.parquet row 1" in msg
    assert "body, label" in msg


@pytest.mark.parametrize("value", [3, None, ["a"], {"a": 1}])
def test_text_not_a_string(tmp_path: Path, value: Any) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": value}])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "'text'" in msg


def test_text_type_is_named(tmp_path: Path) -> None:
    msg = load_error(write_jsonl(tmp_path / "d.jsonl", [{"text": 3}]))
    assert "d.jsonl line 1" in msg
    assert "a number, not text" in msg


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_or_whitespace_text(tmp_path: Path, value: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": value}])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "'text'" in msg
    assert "empty" in msg


def test_csv_empty_text_cell_names_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", 'text,label\nok,1\n"multi\nline",0\n,1\n')
    msg = load_error(path)
    assert "d.csv line 5" in msg
    assert "empty" in msg


def test_parquet_null_text_names_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", None], "label": [0, 1]})
    msg = load_error(path)
    assert "d.parquet row 2" in msg
    assert "'text'" in msg


def test_label_missing_when_other_rows_have_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "'label'" in msg
    assert "line 1" in msg


def test_csv_label_cell_missing_when_others_have_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "text,label\na,1\nb,\n")
    msg = load_error(path)
    assert "d.csv line 3" in msg
    assert "'label'" in msg


def test_require_labels_on_unlabelled_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    msg = load_error(path, require_labels=True)
    assert "d.jsonl line 1" in msg
    assert "'label'" in msg
    assert "required" in msg


def test_require_labels_names_custom_field_in_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a"]})
    msg = load_error(path, label_field="toxic", require_labels=True)
    assert "d.parquet row 1" in msg
    assert "'toxic'" in msg


def test_require_labels_without_label_field() -> None:
    assert "label_field" in load_error(
        "unused.jsonl", label_field=None, require_labels=True
    )


@pytest.mark.parametrize("value", [2, -1, 0.5, "toxic", "2", "yes", [1]])
def test_label_not_binary(tmp_path: Path, value: Any) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": value}]
    )
    msg = load_error(path)
    assert "d.jsonl line 2" in msg
    assert "'label'" in msg
    assert repr(value) in msg
    assert "0 or 1" in msg


def test_csv_label_not_binary_names_custom_field(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "comment,toxic\na,1\nb,toxic\n")
    msg = load_error(path, text_field="comment", label_field="toxic")
    assert "d.csv line 3" in msg
    assert "'toxic'" in msg


def test_parquet_label_not_binary_names_row(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "d.parquet", {"text": ["a", "b", "c"], "label": [0, 1, 2]}
    )
    msg = load_error(path)
    assert "d.parquet row 3" in msg
    assert "'label'" in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    msg = load_error(path)
    assert "d.jsonl" in msg
    assert "no rows" in msg


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_csv(tmp_path: Path, content: str) -> None:
    msg = load_error(write_csv(tmp_path / "d.csv", content))
    assert "d.csv" in msg
    assert "no rows" in msg


def test_empty_parquet(tmp_path: Path) -> None:
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    path = tmp_path / "d.parquet"
    pq.write_table(schema.empty_table(), path)
    msg = load_error(path)
    assert "d.parquet" in msg
    assert "no rows" in msg


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    msg = load_error(path)
    assert "d.parquet" in msg
    assert "Parquet" in msg


def test_csv_with_ragged_rows_is_data_error(tmp_path: Path) -> None:
    msg = load_error(write_csv(tmp_path / "d.csv", "text,label\na,1\nb,0,extra,more\n"))
    assert "d.csv" in msg
    assert "csv" in msg
