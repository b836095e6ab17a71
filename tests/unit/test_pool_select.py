"""The pool strategies on hand-made views (tools/pool/select.py) and the to-label files and
label journal (tools/pool/labels.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tools.errors import ConfigError, DataError
from tools.pool.labels import LabelJournal, LabelRecord, ToLabel, read_labels, write_to_label
from tools.pool.select import (
    PoolView,
    SelectSettings,
    curve_points,
    deficits,
    model_relevant,
    pick,
    pick_new,
    relevant_features,
)
from tools.verify import NearDuplicates


def view(scores: list[float] | None = None, task: list[int] | None = None) -> PoolView:
    """Six pool rows over four features; two labelled rows (one of each label).

    pool row: 0 fires f0; 1 fires f0,f1; 2 fires f1; 3 fires f2; 4 fires f3; 5 fires nothing.
    labelled: a positive firing f0, a negative firing f3."""
    active = sp.csr_matrix(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                     [0, 0, 0, 1], [0, 0, 0, 0]], dtype=np.float32))
    pooled = np.array([[0, 0], [0.1, 0], [1, 1], [5, 5], [-5, 5], [0, 0.1]], dtype=float)
    mask = None
    if task is not None:
        mask = np.zeros(4, dtype=bool)
        mask[task] = True
    return PoolView(
        active=active, pooled=pooled,
        scores=None if scores is None else np.array(scores),
        labelled_active=sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float32)),
        labelled_pooled=np.array([[0, 0], [-5, 5]], dtype=float), labels=np.array([1, 0]),
        groups=np.arange(6), task=mask)


SCORES = [0.9, 0.8, 0.6, 0.5, 0.1, 0.45]


def rows(picks: list) -> list[int]:  # type: ignore[type-arg]
    return [p.row for p in picks]


def test_top_score_and_uncertainty_follow_the_scores() -> None:
    v = view(SCORES)
    assert rows(pick(v, SelectSettings(strategy="top-score"), 3)) == [0, 1, 2]
    # breaking ties: nearest 0.5 first
    assert rows(pick(v, SelectSettings(strategy="uncertainty"), 3)) == [3, 5, 2]
    assert rows(pick(v, SelectSettings(strategy="top-score"), 2, exclude=[0])) == [1, 2]


def test_random_is_seeded_and_coreset_goes_far() -> None:
    v = view(SCORES)
    s = SelectSettings(strategy="random")
    assert rows(pick(v, s, 4, seed=1)) == rows(pick(v, s, 4, seed=1))
    assert sorted(rows(pick(v, s, 6, seed=2))) == list(range(6))
    # k-center: the row farthest from everything labelled (or picked) comes next
    assert rows(pick(view(None), SelectSettings(strategy="coreset"), 2)) == [3, 2]
    assert rows(pick(view(None), SelectSettings(strategy="coreset"), 1, exclude=[3])) == [2]


def test_strategies_that_need_a_model_say_so() -> None:
    for name in ("fac", "uncertainty", "top-score"):
        with pytest.raises(ConfigError, match=f"the {name} strategy needs"):
            pick(view(None), SelectSettings(strategy=name), 2)  # type: ignore[arg-type]


def test_fac_covers_deficits_weighted_by_score() -> None:
    v = view(SCORES, task=[1, 2])  # f1 and f2 are the anchor's task features
    s = SelectSettings(relevance="labels", min_rows=1, score_power=0.0)
    task = relevant_features(v, s)
    # labels: f0 fires on the positive only -> log-odds high enough? one row is not support
    assert task[1] and task[2]
    got = pick(v, s, 2)
    # coverage alone: f1 and f2 each need a row; row 1 (f1) or 2 (f1) then 3 (f2)
    assert {p.row for p in got} & {1, 2} and 3 in rows(got)
    assert all(p.fills for p in got)
    # with the score weighing in, the higher-scored f1 row comes first
    weighted = pick(v, SelectSettings(relevance="labels", min_rows=1, score_power=2.0,
                                      certainty_power=0), 2)
    assert weighted[0].row == 1 and weighted[0].fills == [1]


def test_fac_counts_deficits_down_then_falls_back() -> None:
    v = view(SCORES, task=[1])
    got = pick(v, SelectSettings(relevance="labels", min_rows=1, certainty_power=0), 4)
    assert got[0].fills == [1] and got[0].row == 1, "the highest-scored row firing f1"
    # with doubt weighed in: 0.6 * 0.4^0.5 > 0.8 * 0.2^0.5, the less certain f1 row first
    assert pick(v, SelectSettings(relevance="labels", min_rows=1), 1)[0].row == 2
    assert all(not p.fills for p in got[1:]), "f1 needs one row: the rest by the fallback"
    assert rows(got)[1:] == [3, 5, 2], "uncertainty: nearest 0.5 first"
    by_score = pick(v, SelectSettings(relevance="labels", min_rows=1, fallback="top-score",
                                      certainty_power=0), 4)
    assert rows(by_score) == [1, 0, 2, 3]


def test_model_relevance_is_lift_over_the_pool_mean() -> None:
    v = view(SCORES)
    lifted = model_relevant(v.active, v.scores, min_lift=1.5, min_rows=1)  # type: ignore[arg-type]
    mean = float(np.mean(SCORES))
    assert lifted[0] == (0.85 >= 1.5 * mean)  # f0 rows score 0.9 and 0.8
    assert not lifted[3]  # f3's row scores 0.1
    need = deficits(v, SelectSettings(min_rows=2), np.array([True] * 4), 10)
    assert need.tolist() == [1, 2, 1, 1]  # f0 has one labelled row, f3 one; capped by supply


def test_pick_new_skips_near_duplicates_and_asks_again() -> None:
    v = view(SCORES)
    texts = ["how do i bake bread at home", "how do i bake bread at home please",
             "a poem about the sea", "tell me a joke", "directions to the station", "hello"]
    seen = NearDuplicates(0.5)
    seen.add("a poem about the sea")
    got = pick_new(v, SelectSettings(strategy="top-score", near_threshold=0.5), 3, texts, seen)
    assert rows(got) == [0, 3, 5], "row 1 copies row 0, row 2 a labelled text"


def test_curve_points() -> None:
    assert curve_points(200, 25, None) == [25, 50, 100, 200]
    assert curve_points(100, 25, [10, 50, 300]) == [10, 50, 100]
    assert curve_points(30, 25, None) == [25, 30]


def test_to_label_files_and_reading_them_back(tmp_path: Path) -> None:
    csv_path, jsonl_path = write_to_label(tmp_path, 1, [
        ToLabel(row=4, text='say "hi", then, bye', fills="7: insults", score=0.25),
        ToLabel(row=9, text="line one\nline two")])
    assert json.loads(jsonl_path.read_text().splitlines()[0])["row"] == 4
    text = csv_path.read_text().replace(",0.25,", ",0.25,1")  # row 4 labelled 1
    (tmp_path / "f.csv").write_text(text)
    got, empty = read_labels(tmp_path / "f.csv", {4, 9})
    assert got == {4: 1} and empty == 1
    (tmp_path / "g.jsonl").write_text('{"row": 4, "label": "skip"}\n{"row": 9, "label": 0}\n')
    assert read_labels(tmp_path / "g.jsonl", {4, 9}) == ({4: None, 9: 0}, 0)
    for content, problem in [
        ('{"row": 4, "label": 2}\n', "g.jsonl line 1: label 2 for row 4"),
        ('{"row": "x", "label": 1}\n', "line 1: field 'row' is 'x'"),
        ('{"row": 4, "label": 1}\n{"row": 4, "label": 0}\n', "line 2: row 4 again"),
        ('{"row": 5, "label": 1}\n', "row 5 is not waiting"),
        ('{"row": 4, "label": true}\n', "label True"),
        ('[1, 2]\n', "expected a JSON object"),
    ]:
        (tmp_path / "g.jsonl").write_text(content)
        with pytest.raises(DataError, match=problem):
            read_labels(tmp_path / "g.jsonl", {4, 9})
    (tmp_path / "h.csv").write_text("id,label\n4,1\n")
    with pytest.raises(DataError, match="h.csv line 1: no row column"):
        read_labels(tmp_path / "h.csv", {4})


def test_journal_keeps_the_first_label_and_survives_a_torn_line(tmp_path: Path) -> None:
    journal = LabelJournal(tmp_path / "labels.jsonl")
    assert journal.add([LabelRecord(row=1, label=1, round=1, source="human")]) == 1
    assert journal.add([LabelRecord(row=1, label=0, round=1, source="human"),
                        LabelRecord(row=2, label=None, round=1, source="human")]) == 1
    with journal.path.open("ab") as f:
        f.write(b'{"row": 3, "lab')  # killed mid-write
    known = journal.read()
    assert known[1].label == 1 and known[2].label is None and 3 not in known
    journal.add([LabelRecord(row=3, label=0, round=1, source="human")])
    assert journal.read()[3].label == 0
