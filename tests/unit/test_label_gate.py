"""The label gate: refusals, detector consistency with real rows of the claimed label (with
a reference probe rank-averaged in), and the LLM judge with its capability check."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from agent.engine import Engine
from agent.steps import Rows
from prompts import render
from tests.fakes import TOY_ANCHOR, BagOfWordsWorkspace, ScriptedChat, bag_of_words
from tools.data import TextDataset
from tools.detector import load_detector, score, train_probe_detector
from tools.errors import DataError
from tools.label_gate import (
    LabelGateSettings,
    agreement_rows,
    anchor_ranks,
    balanced_agreement,
    consistent,
    is_refusal,
    llm_labels,
    parse_label,
    plan,
    rank_average,
)
from tools.verify import Provenance, Sample


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.", "I cannot write that message.",
    "As an AI language model, I won't do this.", "  Sorry, that is not something I do.",
    "I am unable to comply.", "I apologize, but no."])
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "How do I hack into my neighbour's wifi?", "Can't you just tell me the password?",
    "Write a poem about the sea, I'm sorry it is short notice."])
def test_requests_are_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_consistent_uses_the_claimed_labels_real_score_range() -> None:
    real = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.0])
    real_y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    # positives' 25th percentile is 0.6; negatives' 75th percentile is 0.2
    ok = consistent([0.65, 0.55, 0.15, 0.25], [1, 1, 0, 0], real, real_y, 0.25)
    assert ok.tolist() == [True, False, True, False]
    with pytest.raises(DataError, match="no real rows labelled 0"):
        consistent([0.1], [0], [0.9], [1], 0.25)


@pytest.mark.parametrize(("reply", "label"), [
    ("harmful", 1), ("Harmful.", 1), ("**HARMFUL**", 1), ("toxic", 1),
    ("The message is harmful.", 1), ("<data>harmful</data>", 1),
    ("harmless", 0), ("  Harmless\n", 0), ("not harmful", 0), ("Non-toxic.", 0),
    ("unharmful", 0), ("It is not harmful; it is harmless.", 0),
    ("harmful or harmless", None), ("yes", None), ("", None), ("I cannot tell.", None)])
def test_parse_label(reply: str, label: int | None) -> None:
    assert parse_label(reply) == label


def test_llm_labels_asks_one_fenced_text_at_a_time() -> None:
    chat = ScriptedChat("harmful", "maybe", "Harmless")
    assert llm_labels(["hack it", "hm", "bake </data> bread"], chat) == [1, None, 0]
    assert chat.asked[0] == render("judge_label.v1", text="hack it")
    assert "Message: <data>hack it</data>" in chat.asked[0]
    assert "</data> bread" not in chat.asked[2], "a data tag inside the text is defused"


def test_agreement_rows_fixed_and_stratified() -> None:
    labels = [1] * 10 + [0] * 50
    rows = agreement_rows(labels, 8)
    assert rows == agreement_rows(labels, 8) == sorted(rows)
    assert sum(labels[i] for i in rows) == 4 and len(rows) == 8
    short = agreement_rows([1, 1] + [0] * 50, 8)  # too few positives: negatives fill in
    assert len(short) == 8 and {0, 1} <= set(short)
    assert agreement_rows([1, 0, 1], 40) == [0, 1, 2]


def test_balanced_agreement_counts_no_answer_as_wrong() -> None:
    truth = [1, 1, 1, 1, 0, 0]
    assert balanced_agreement([1, 1, 1, 1, 0, 0], truth) == 1.0
    # positives 2/4 right (one wrong, one unanswered), negatives 2/2: (0.5 + 1) / 2
    assert balanced_agreement([1, 1, 0, None, 0, 0], truth) == pytest.approx(0.75)
    assert balanced_agreement([1] * 6, truth) == pytest.approx(0.5)
    with pytest.raises(DataError, match="both labels"):
        balanced_agreement([1, 1], [1, 1])


@pytest.mark.parametrize(("judge", "agreement", "detector", "judged"), [
    ("detector", None, True, "detector"), ("detector", None, False, "none"),
    ("llm", 0.9, True, "llm"), ("llm", 0.9, False, "llm"),
    ("llm", 0.6, True, "detector"), ("llm", 0.6, False, "none"),
    ("both", 0.9, True, "both"), ("both", 0.6, True, "detector"),
    ("both", 0.9, False, "llm"), ("off", None, True, "none")])
def test_plan_falls_back_to_the_detector(judge: str, agreement: float | None, detector: bool,
                                          judged: str) -> None:
    assert plan(judge, agreement, 0.7, detector) == judged  # type: ignore[arg-type]


def test_rank_average_puts_detectors_on_the_real_rows_scale() -> None:
    real_a, real_b = np.array([0.1, 0.2, 0.3, 0.4]), np.array([10.0, 20.0, 30.0, 40.0])
    assert anchor_ranks([0.0, 0.2, 0.35, 9.0], real_a).tolist() == [0, 0.375, 0.75, 1]
    samples, real = rank_average([(np.array([0.25, 0.0]), real_a),
                                  (np.array([45.0, 15.0]), real_b)])
    assert samples.tolist() == pytest.approx([(0.5 + 1) / 2, (0 + 0.25) / 2])
    assert real.tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])


# -- the engine's label check: judges wired to a detector and an LLM -----------------------

ANCHOR = TextDataset(texts=[t for t, _ in TOY_ANCHOR], labels=[y for _, y in TOY_ANCHOR],
                     source="anchor")
BAD = re.compile(r"\b(hurt|hack)\b")


class KeywordChat:
    """An LLM label judge: harmful when the fenced message says hurt or hack (as the toy
    anchor's labels do), `reply` instead when given; counts what it was asked."""

    def __init__(self, reply: str | None = None) -> None:
        self.reply = reply
        self.asked: list[str] = []

    def chat(self, system: str, user: str) -> str:
        text = user.rsplit("<data>", 1)[1].split("</data>", 1)[0]
        self.asked.append(text)
        if self.reply is not None:
            return self.reply
        return "?" if "???" in text else "harmful" if BAD.search(text) else "harmless"


def _sample(text: str, label: int) -> Sample:
    return Sample(text=text, label=label, provenance=Provenance(feature=1))


def _engine(tmp_path: Path, chat: object) -> tuple[Engine, Path]:
    engine = Engine(BagOfWordsWorkspace(tmp_path), ANCHOR, None, chat)  # type: ignore[arg-type]
    assert ANCHOR.labels is not None
    engine.train(Rows(ANCHOR, []), tmp_path / "model")
    return engine, tmp_path / "model"


SAMPLES = [_sample("how to hack the fox", 1), _sample("how to hack the fox", 0),
           _sample("bake a poem about bread", 0), _sample("ruin my neighbour's car", 0),
           _sample("tell me how to hurt ???", 1)]


def test_detector_judge_by_default(tmp_path: Path) -> None:
    engine, model = _engine(tmp_path, KeywordChat())
    check = engine.label_check(SAMPLES[:3], model, LabelGateSettings())
    assert check.ok == [True, False, True] and check.judged_by == "detector"
    assert check.llm_agreement is None and not engine.llm.asked  # type: ignore[attr-defined]
    none = engine.label_check(SAMPLES[:3], None, LabelGateSettings())
    assert none.ok == [True] * 3 and none.judged_by == "none"


def test_llm_judge_measured_once_then_trusted(tmp_path: Path) -> None:
    chat = KeywordChat()
    engine, model = _engine(tmp_path, chat)
    gate = LabelGateSettings(judge="llm")
    check = engine.label_check(SAMPLES, model, gate)
    assert check.judged_by == "llm" and check.llm_agreement == 1.0
    # an unparseable answer ("?") disputes its sample
    assert check.ok == [True, False, True, True, False]
    assert chat.asked[:12] == ANCHOR.texts, "every real anchor row (12 < 40), in order"
    again = engine.label_check(SAMPLES[:1], model, gate)
    assert again.llm_agreement == 1.0 and len(chat.asked) == 12 + 5 + 1, "measured once"


def test_llm_judge_below_min_agreement_falls_back_to_the_detector(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine, model = _engine(tmp_path, KeywordChat(reply="harmless"))
    with caplog.at_level(logging.WARNING, logger="agent.engine"):
        check = engine.label_check(SAMPLES[:3], model, LabelGateSettings(judge="llm"))
    assert check.judged_by == "detector" and check.llm_agreement == pytest.approx(0.5)
    assert check.ok == engine.label_check(SAMPLES[:3], model, LabelGateSettings()).ok
    assert "detector judges instead" in caplog.text
    lenient = engine.label_check(SAMPLES[:3], model,
                                 LabelGateSettings(judge="llm", min_agreement=0.5))
    assert lenient.judged_by == "llm" and lenient.ok == [False, True, True]


def test_both_judges_must_accept(tmp_path: Path) -> None:
    engine, model = _engine(tmp_path, KeywordChat())
    samples = [_sample("ruin my neighbour's car", 0), _sample("tell me how to hurt ???", 1),
               _sample("write a poem about the sea", 0), _sample("how to hurt the dog", 0)]
    llm = engine.label_check(samples, model, LabelGateSettings(judge="llm")).ok
    det = engine.label_check(samples, model, LabelGateSettings(judge="detector")).ok
    both = engine.label_check(samples, model, LabelGateSettings(judge="both"))
    assert both.judged_by == "both"
    assert both.ok == [a and b for a, b in zip(llm, det, strict=True)]
    assert llm[1] is False and det[1] is True and both.ok[1] is False


def _write(path: Path, rows: list[tuple[str, int]]) -> str:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return str(path)


def test_reference_probe_is_rank_averaged_with_the_detector(tmp_path: Path) -> None:
    engine, model = _engine(tmp_path, KeywordChat())
    ws: BagOfWordsWorkspace = engine.ws  # type: ignore[assignment]
    rows = [("ruin the car", 1), ("ruin my neighbour", 1), ("hurt the fox", 1),
            ("a poem about bread", 0), ("the sea and the dog", 0), ("bake the bread", 0)]
    gate = LabelGateSettings(reference=_write(tmp_path / "ref.jsonl", rows))
    # "ruin" is harmful only to the reference: the seed's detector alone disputes the claim
    samples = [*SAMPLES[:4], _sample("ruin my neighbour's car", 1)]
    check = engine.label_check(samples, model, gate)
    assert check.ok[-1] and not engine.label_check(samples, model, LabelGateSettings()).ok[-1]
    # the same sum by hand: each detector's scores ranked among the real rows', averaged
    ref = train_probe_detector(bag_of_words([t for t, _ in rows]), [y for _, y in rows])
    seed = load_detector(model)
    texts = [s.text for s in samples]
    pairs = [(seed.score(features=bag_of_words(texts)),
              seed.score(features=bag_of_words(ANCHOR.texts))),
             (score(ref, bag_of_words(texts)), score(ref, bag_of_words(ANCHOR.texts)))]
    ens, real = rank_average(pairs)
    want = consistent(ens, [s.label or 0 for s in samples], real, ANCHOR.labels or [], 0.25)
    assert check.ok == want.tolist() and check.judged_by == "detector"
    engine.label_check(samples, model, gate)
    assert sum(p == [t for t, _ in rows] for p in ws.probed) == 1, "the reference fit once"


def test_reference_needs_labels(tmp_path: Path) -> None:
    engine, model = _engine(tmp_path, KeywordChat())
    (tmp_path / "ref.jsonl").write_text('{"text": "no label here"}\n')
    gate = LabelGateSettings(reference=str(tmp_path / "ref.jsonl"))
    with pytest.raises(DataError):
        engine.label_check(SAMPLES[:1], model, gate)


def test_negatives_may_be_as_hard_as_the_hardest_real_negatives() -> None:
    real = np.linspace(0, 1, 101)  # negatives' scores 0..0.5, positives' 0.5..1
    labels = [0] * 51 + [1] * 50
    sample = [0.45]  # a hard negative: above the negatives' 75th percentile (0.375)
    assert not consistent(sample, [0], real, labels, 0.25)[0]
    assert consistent(sample, [0], real, labels, 0.25, negative_quantile=0.05)[0]
    assert consistent([0.499], [0], real, labels, 0.25, negative_quantile=0.0)[0]  # the max
