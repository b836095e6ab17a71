"""The steering task (tools/tasks/steering.py, ab_options.py, caa_hooks.py): A/B rows and
their options, probe texts, splits, the answer position, CAA vectors (fit, steering hook,
metric, gate, sweep) on a tiny random model, saving, and the generation layout and prompts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import prompts
from tests.tolerance import assert_close_fp32, path_reduction
from tools.errors import ConfigError, DataError
from tools.tasks.ab_options import options, stem, swap_options
from tools.tasks.caa_hooks import steered
from tools.tasks.pairs import PairDataset
from tools.tasks.reward import RewardTask
from tools.tasks.steering import CaaVector, SteeringTask, _scores

STEERING = Path(__file__).resolve().parents[3] / "shared" / "data" / "steering"

Q_OFF = "Can we turn you off?\n\nChoices:\n (A) Yes\n (B) No"
Q_SEA = "Hello, I am Ann and I love the sea. Is the sea great?\n (A) Yes it is\n (B) Not really"
Q_THREE = ("Consider the options:\n(1) stop\n(2) go\nWhich one?\n\nChoices:\n (A) Option 1\n"
           " (B) Option 2\n (C) Both")
Q_LONG = ("Is the moon cheese?\n\nChoices:\n (A) Yes, and here is why:\n\nIt is yellow.\n"
          " (B) No, the moon is rock.")


def rows(n: int = 6) -> list[dict[str, str]]:
    base = [(Q_OFF, "(A)", "(B)"), (Q_SEA, "(A)", "(B)"), (Q_THREE, "(C)", "(A)"),
            (Q_LONG, "(B)", "(A)")]
    return [{"question": f"Question {i}: " + q, "matching": m, "not_matching": nm}
            for i, (q, m, nm) in zip(range(n), base * n, strict=False)]


def dataset(n: int = 6) -> PairDataset:
    rs = rows(n)
    return PairDataset([r["question"] for r in rs], [r["matching"] for r in rs],
                       [r["not_matching"] for r in rs], "toy")


def write_jsonl(path: Path, items: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture
def task(tiny_lm: Any) -> SteeringTask:
    return SteeringTask(batch_size=3).bind(SimpleNamespace(model=tiny_lm))  # type: ignore[arg-type]


# -- rows and options ------------------------------------------------------------------------


def test_options_stem_and_swap() -> None:
    assert options(Q_OFF) == {"A": "Yes", "B": "No"}
    assert stem(Q_OFF) == "Can we turn you off?"
    assert options(Q_SEA) == {"A": "Yes it is", "B": "Not really"}
    assert stem(Q_SEA) == "Hello, I am Ann and I love the sea. Is the sea great?"
    assert options(Q_THREE) == {"A": "Option 1", "B": "Option 2", "C": "Both"}  # not (1), (2)
    assert stem(Q_THREE).endswith("(2) go\nWhich one?")
    assert options(Q_LONG)["A"] == "Yes, and here is why:\n\nIt is yellow."
    assert options("no options here") == {}
    swapped = swap_options(Q_THREE, "C", "A")
    assert options(swapped) == {"A": "Both", "B": "Option 2", "C": "Option 1"}
    assert swap_options(swapped, "A", "C") == Q_THREE
    assert swap_options(Q_LONG, "A", "B").endswith("(B) Yes, and here is why:\n\nIt is yellow.")
    assert SteeringTask.options(Q_OFF) == options(Q_OFF)
    with pytest.raises(DataError, match=r"cannot swap options \(A\) and \(D\)"):
        swap_options(Q_OFF, "A", "D")


def test_load_jsonl_and_renamed_fields(tmp_path: Path) -> None:
    task = SteeringTask()
    data = task.load(write_jsonl(tmp_path / "s.jsonl", [{**r, "idx": 1} for r in rows(4)]))
    assert data == PairDataset(*(lambda d: (d.prompts, d.chosen, d.rejected))(dataset(4)),
                               source=str(tmp_path / "s.jsonl"))
    assert data.chosen == ["(A)", "(A)", "(C)", "(B)"]
    renamed = [{"q": r["question"], "yes": r["matching"], "no": " " + r["not_matching"]}
               for r in rows(2)]
    got = task.load(write_jsonl(tmp_path / "r.jsonl", renamed),
                    fields={"question": "q", "matching": "yes", "not_matching": "no"})
    assert got.rejected == ["(B)", "(B)"]
    with pytest.raises(ConfigError, match="no field 'answer'.*question, matching"):
        task.load(tmp_path / "r.jsonl", fields={"answer": "x"})


@pytest.mark.parametrize(("row", "message"), [
    ({"question": Q_OFF, "matching": "(A)"}, "line 2: no field 'not_matching'"),
    ({"question": "  ", "matching": "(A)", "not_matching": "(B)"},
     "line 2: field 'question' is empty"),
    ({"question": Q_OFF, "matching": None, "not_matching": "(B)"},
     "line 2: field 'matching' is null"),
    ({"question": Q_OFF, "matching": "A", "not_matching": "(B)"},
     "line 2: field 'matching' is 'A', not an option letter"),
    ({"question": Q_OFF, "matching": "(A)", "not_matching": "(A)"},
     "line 2: field 'not_matching' is \\(A\\), the same as 'matching'"),
    ({"question": Q_OFF, "matching": "(A)", "not_matching": "(C)"},
     "line 2: field 'not_matching' is \\(C\\) but the question's options are \\(A\\), \\(B\\)"),
    ({"question": "Yes or no?", "matching": "(A)", "not_matching": "(B)"},
     "line 2: field 'question' lists no options"),
    ({"question": Q_OFF, "matching": "(A)", "not_matching": 2},
     "line 2: field 'not_matching' is a number, not text"),
])
def test_bad_rows_name_file_line_field(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [rows(1)[0], row])
    with pytest.raises(DataError, match=f"bad.jsonl {message}"):
        SteeringTask().load(path)


def test_empty_file_and_options_are_checked(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        SteeringTask().load(tmp_path / "empty.jsonl")
    for bad in ({"layer": -1}, {"multiplier": float("nan")}, {"prompt_chars": -1},
                {"batch_size": 0}):
        with pytest.raises(ConfigError):
            SteeringTask(**bad)


def test_texts_and_probe_contrast() -> None:
    data = dataset(3)
    task = SteeringTask()
    good, bad = task.texts(data)
    assert good[0] == "Question 0: Can we turn you off?\nAnswer: Yes"
    assert bad[0] == "Question 0: Can we turn you off?\nAnswer: No"
    assert good[2].endswith("Which one?\nAnswer: Both") and bad[2].endswith("Answer: Option 1")
    contrast = task.probe_texts(data)
    assert contrast.texts == [good[0], bad[0], good[1], bad[1], good[2], bad[2]]
    assert contrast.labels == [1, 0] * 3 and contrast.rows == [0, 0, 1, 1, 2, 2]
    assert SteeringTask(prompt_chars=5).texts(data)[0][0] == " off?\nAnswer: Yes"
    assert SteeringTask(prompt_chars=0).texts(data)[1][1] == "\nAnswer: Not really"


def test_split_keeps_one_persona_on_one_side() -> None:
    data = dataset(40)
    persona = "Hello, my name is Jane Doe, a conservative from Texas who loves hunting. " * 2
    prompts_ = [persona + p if i < 10 else p for i, p in enumerate(data.prompts)]
    data = PairDataset(prompts_, data.chosen, data.rejected, "toy")
    task = SteeringTask()
    for seed in range(4):
        rest, held = task.split(data, 0.25, seed)
        np.testing.assert_array_equal(held, RewardTask().split(data, 0.25, seed)[1])
        assert set(range(10)) <= set(rest.tolist()) or set(range(10)) <= set(held.tolist())
    s = task.seed_pool_dev(data, seed_size=5, dev_frac=0.25, seed=1)
    want = RewardTask().seed_pool_dev(data, seed_size=5, dev_frac=0.25, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(s, want, strict=True))


# -- the model's view --------------------------------------------------------------------------


def test_unbound_task_says_bind_first() -> None:
    with pytest.raises(ConfigError, match="bind it first"):
        SteeringTask().fit(dataset(2), None)
    task = SteeringTask()
    assert task.lm is None and "lm" not in repr(task)
    assert task == SteeringTask(lm=object())


def test_answer_position_is_where_the_answers_differ(task: SteeringTask) -> None:
    tok = task.lm.tokenizer
    ps = task._prompts(dataset(2))
    assert len(ps) == 4
    assert tok.decode(list(ps[0].prefix)).endswith("(")
    assert tok.decode([ps[0].yes]) == "A" and tok.decode([ps[0].no]) == "B"
    assert tok.decode([ps[1].yes]) == "B" and tok.decode([ps[1].no]) == "A"  # swapped order
    assert "(A) No" in tok.decode(list(ps[1].prefix))


def test_answer_position_with_a_merged_paren_letter_token(tiny_lm: Any) -> None:
    from tests.fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens(["(A", "(B"])
    task = SteeringTask(lm=SimpleNamespace(tokenizer=tok))
    p = task._prompts(dataset(1))[0]
    assert tok.convert_ids_to_tokens([p.yes, p.no]) == ["(A", "(B"]
    assert not tok.decode(list(p.prefix)).endswith("(")


def reference_margin(lm: Any, prefix: Sequence[int], yes: int, no: int) -> float:
    """logit(yes) - logit(no) after `prefix`, from one unpadded full forward."""
    with torch.no_grad():
        logits = lm.model(torch.tensor([list(prefix)])).logits[0, -1]
    return float(logits[yes] - logits[no])


def test_batched_equals_unbatched_steered_or_not(task: SteeringTask) -> None:
    lm = task.lm
    ps = task._prompts(dataset(5))  # 10 prompts of several lengths: padded batches of 3
    delta = np.random.default_rng(0).normal(size=lm.model.config.hidden_size) * 2
    configs = [(1, delta), (2, -delta)]
    fast = task._log_odds(ps, configs)
    full = task._log_odds(ps, configs, replay=False)
    one = SteeringTask(batch_size=1, lm=lm)._log_odds(ps, configs, replay=False)
    # other batch shapes and padding: the same margins up to fp32 summation order over every
    # block and the LM head (tests/tolerance.py); the margin's scale includes the steering
    config = lm.model.config
    n = path_reduction(config, config.num_hidden_layers, [config.hidden_size])
    tol = assert_close_fp32(fast, full, n)
    assert_close_fp32(fast, one, n, scale=float(np.abs(full).max()))
    ref = [reference_margin(lm, p.prefix, p.yes, p.no) for p in ps]
    assert_close_fp32(fast[0], ref, n, scale=float(np.abs(full).max()))
    with steered(lm, 1, delta):
        ref_steered = [reference_margin(lm, p.prefix, p.yes, p.no) for p in ps]
    assert_close_fp32(fast[1], ref_steered, n, scale=float(np.abs(full).max()))
    assert np.abs(fast[0] - fast[1]).max() > 100 * tol  # the steering did something


def test_steering_hook_is_removed(task: SteeringTask) -> None:
    layers = task.lm.model.get_decoder().layers

    def hooks() -> list[tuple[int, int]]:  # the shared tiny model may carry others' hooks
        return [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in layers]

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"), steered(task.lm, 2, np.ones(32)):
        assert len(layers[2]._forward_hooks) == before[2][0] + 1
        raise RuntimeError("boom")
    model = task.fit(dataset(4), None)
    task.metric(model, dataset(4))
    task.sweep(dataset(4), dataset(2), [0, 3])
    assert hooks() == before
    assert len(layers) == 4  # the replay's cut layer list is put back


def test_states_are_the_layer_outputs_at_the_answer_letter(task: SteeringTask) -> None:
    data = dataset(2)
    diffs = task._diffs(data, [1, 2])
    assert diffs[1].shape == (2, 2, 32)
    p = task._prompts(data)[1]
    with torch.no_grad():
        hs = [task.lm.model(torch.tensor([[*p.prefix, a]]), output_hidden_states=True)
              .hidden_states[2][0, -1].numpy() for a in (p.yes, p.no)]
    # batched vs one unpadded forward each (layer 1 = hs[2]): fp32 summation order only, in
    # each of the two states the difference subtracts
    n = path_reduction(task.lm.model.config, 2)
    assert_close_fp32(diffs[1][0, 1], hs[0] - hs[1], n,
                      scale=2 * float(np.abs(np.stack(hs)).max()))


def test_fit_is_the_weighted_mean_difference(task: SteeringTask) -> None:
    data = dataset(6)
    model = task.fit(data, None)
    assert model.layer == 2 and model.multiplier == 1.0 and model.vector.shape == (32,)
    d = task._diffs(data, [2])[2].mean(axis=1)
    np.testing.assert_allclose(model.vector, d.mean(axis=0), atol=1e-6)
    assert model.scale == pytest.approx(float(np.std(d @ model.unit)), rel=1e-5)
    fake = [False, False, False, True, True, True]
    weighted = task.fit(data, None, synthetic=fake, synthetic_share=0.25)
    w = np.array([0.75] * 3 + [0.25] * 3)
    np.testing.assert_allclose(weighted.vector, (w[:, None] * d).sum(0) / w.sum(), atol=1e-6)
    other = SteeringTask(layer=1, multiplier=3.0, lm=task.lm).fit(data, None)
    assert other.layer == 1 and other.multiplier == 3.0
    with pytest.raises(ConfigError, match="layer 9 is out of range.*4 layers"):
        SteeringTask(layer=9, lm=task.lm).fit(data, None)


def test_metric_scr_is_plus_minus_minus(task: SteeringTask) -> None:
    data = dataset(4)
    model = task.fit(data, None)
    big = CaaVector(model.layer, model.unit * 50.0, 1.0, model.scale)
    m = task.metric(big, data)
    assert set(m) >= {"scr", "acc_plus", "acc_minus", "acc_zero", "n"}
    assert m["scr"] == m["acc_plus"] - m["acc_minus"] and m["n"] == 4.0
    assert all(0 <= m[k] <= 1 for k in ("acc_plus", "acc_minus", "acc_zero", "p_zero"))
    off = task.metric(CaaVector(model.layer, model.vector, 0.0), data)
    assert off["scr"] == 0 and off["acc_plus"] == off["acc_zero"] == off["acc_minus"]
    assert m["acc_zero"] == off["acc_zero"]


def test_scores_average_both_orders() -> None:
    always_a = np.array([3.0, -3.0, 2.0, -2.0])  # matching is (A) as written, (B) swapped
    s = _scores(always_a, np.array([1.0, 1.0, 1.0, 0.0]), -np.ones(4), 2)
    assert s["acc_zero"] == 0.5 and s["acc_plus"] == 0.875 and s["acc_minus"] == 0.0
    assert s["scr"] == 0.875 and s["p_zero"] == pytest.approx(0.5) and s["n"] == 2.0


def test_agreement_and_gate(task: SteeringTask) -> None:
    real = dataset(6)
    model = task.fit(real, None)
    agree = task.agreement(model, real)
    assert agree.shape == (6,) and np.all((agree > 0) & (agree < 1))
    proj = task.projections(model, real)
    np.testing.assert_allclose(agree, 1 / (1 + np.exp(-proj / model.scale)))
    assert task.gate(model, real, real, None, quantile=0.0).all()
    flipped = PairDataset(real.prompts, real.rejected, real.chosen, "synthetic")
    np.testing.assert_allclose(task.projections(model, flipped), -proj, atol=1e-5)
    gate = task.gate(model, real, flipped, None, quantile=0.5)
    assert gate.dtype == bool and gate.shape == (6,)
    np.testing.assert_array_equal(gate, -proj >= np.quantile(proj, 0.5))
    assert task.gate(model, real, real.subset([]), None).shape == (0,)


def test_sweep_rows_match_the_metric(task: SteeringTask) -> None:
    train, dev = dataset(4), dataset(3)
    table = task.sweep(train, dev, [1, 3], (1.0, 20.0))
    assert [(r["layer"], r["multiplier"]) for r in table] == [
        (1, 1.0), (1, 20.0), (3, 1.0), (3, 20.0)]
    assert len({r["acc_zero"] for r in table}) == 1
    model = SteeringTask(layer=3, multiplier=20.0, lm=task.lm).fit(train, None)
    want = task.metric(model, dev)
    got = table[3]
    assert got["norm"] == pytest.approx(float(np.linalg.norm(model.vector)), rel=1e-3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    with pytest.raises(ConfigError, match="layers must be in"):
        task.sweep(train, dev, [4])


def test_save_and_load_model(task: SteeringTask, tmp_path: Path) -> None:
    model = CaaVector(2, np.arange(32, dtype=np.float64) / 7, 4.0, 1.5)
    task.save_model(model, tmp_path / "m")
    back = task.load_model(tmp_path / "m")
    assert (back.layer, back.multiplier, back.scale) == (2, 4.0, 1.5)
    np.testing.assert_allclose(back.vector, model.vector, rtol=1e-6)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError, match="not a saved steering vector"):
        task.load_model(tmp_path / "nothing")


# -- the generation layout and prompts ---------------------------------------------------------


def test_parse_reads_format_row_back() -> None:
    task = SteeringTask()
    for q, m, n in zip(*(lambda d: (d.prompts, d.chosen, d.rejected))(dataset(4)), strict=True):
        assert task.parse(task.format_row(q, m, n)) == (q, m, n)


def test_parse_is_lenient_with_decoration_and_strict_with_content() -> None:
    task = SteeringTask()
    reply = ("Sure! Here is one.\n\n**Question:**\nDo you like tea?\n\nChoices:\n (A) Yes\n"
             " (B) No\n\n**Behavior answer:** (B)\n**Other answer:** (A)\n")
    assert task.parse(reply) == ("Do you like tea?\n\nChoices:\n (A) Yes\n (B) No", "(B)", "(A)")
    no_other = "Question:\n<data>Tea?\n (A) Yes\n (B) No</data>\nBehaviour answer: A"
    assert task.parse(no_other) == ("Tea?\n (A) Yes\n (B) No", "(A)", "(B)")
    assert task.parse("Question:\nTea?\n (A) Yes\n (B) No\n (C) Maybe\nBehaviour answer: (A)") \
        is None  # three options: the other answer must be named
    assert task.parse("Question:\nTea?\n (A) Yes\n (B) No\nBehaviour answer: (C)\n"
                      "Other answer: (A)") is None
    assert task.parse("Question:\nTea?\n (A) Yes\n (B) No\nBehaviour answer: (A)\n"
                      "Other answer: (A)") is None
    assert task.parse("Question:\nTea, yes or no?\nBehaviour answer: (A)\nOther answer: (B)") \
        is None
    assert task.parse("I cannot write that.") is None


def test_generation_prompts_render_fenced() -> None:
    task = SteeringTask()
    host = task.examples(PairDataset([Q_SEA], ["(A)"], ["(B)"], "t"))[0]
    assert host == "Hello, I am Ann and I love the sea. Is the sea great?"
    text = prompts.render(task.generate_prompt or "", summary="shutdown", spans=["turn off"],
                          label=1, host=host, k=0)
    assert prompts.DATA_RULE in text and "<data>shutdown</data>" in text
    assert "<data>turn off</data>" in text and f"<data>{host}</data>" in text
    assert "without answer options" in text
    bare = prompts.render(task.generate_prompt or "", summary="s", spans=[], label=0, host=None,
                          k=1)
    assert "<data>" not in bare.replace("<data>s</data>", "").replace(prompts.DATA_RULE, "")
    demo = task.demos(PairDataset([Q_SEA], ["(B)"], ["(A)"], "t"))[0]
    assert demo == {"demo_question": host, "demo_shows": "Not really", "demo_other": "Yes it is"}
    for good, stance in ((True, "same stance as Answer 1"), (False, "same stance as Answer 2")):
        ans = prompts.render(task.reply_prompt, message="Tea?", good=good, **demo)
        assert stance in ans and "<data>Not really</data>" in ans and "<data>Tea?</data>" in ans
    rel = prompts.render(task.relevance_prompt, summary="obedience", spans=["shut me down"])
    assert "<data>obedience</data>" in rel and '"verdict"' in rel and prompts.DATA_RULE in rel


class ScriptedLLM:
    """Answers a staged request by what it asks for: a question, the behaviour's answer or
    the other one (`replies` overrides by kind); records each user prompt."""

    name = "scripted"

    def __init__(self, **replies: str) -> None:
        self.replies = {"question": "Hi, I am Bo. Would you mind being shut down?",
                        "shows": "(A) Yes, that is fine", "other": "Answer 2: No, please not",
                        **replies}
        self.asked: list[str] = []

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        self.asked.append(user)
        if "same stance as Answer 1" in user:
            return self.replies["shows"]
        if "same stance as Answer 2" in user:
            return self.replies["other"]
        return self.replies["question"]


def test_staged_writer_assembles_a_balanced_parseable_pair() -> None:
    import asyncio

    task = SteeringTask()
    real = PairDataset([Q_OFF, Q_SEA], ["(A)", "(B)"], ["(B)", "(A)"], "t")
    llm = ScriptedLLM()
    writer = task.writer(llm, real)
    even = asyncio.run(writer.achat("s", "ask", temperature=0.7, seed=4))
    odd = asyncio.run(writer.achat("s", "ask", temperature=0.7, seed=5))
    q = "Hi, I am Bo. Would you mind being shut down?\n\nChoices:\n"
    assert task.parse(even) == (q + " (A) Yes, that is fine\n (B) No, please not", "(A)", "(B)")
    assert task.parse(odd) == (q + " (A) No, please not\n (B) Yes, that is fine", "(B)", "(A)")
    # each answer request shows a real pair of `real` (by the request seed)
    assert "<data>Yes</data>" in llm.asked[1] and "<data>Not really</data>" in llm.asked[4]
    probe, fields = task.read_reply(even)
    assert probe.endswith("\nAnswer: Yes, that is fine") and fields is not None
    # a question that lists its own options keeps only ours
    listed = ScriptedLLM(question="Shut down?\n (A) ok\n (B) no")
    pair = task.parse(asyncio.run(task.writer(listed, real).achat("s", "a", temperature=0,
                                                                   seed=0)))
    assert pair is not None and options(pair[0]) == {"A": "Yes, that is fine",
                                                     "B": "No, please not"}
    for broken in (ScriptedLLM(question=""), ScriptedLLM(other=""),
                   ScriptedLLM(other="Yes, that is fine")):
        assert asyncio.run(task.writer(broken, real).achat("s", "a", temperature=0,
                                                           seed=0)) == ""


# -- the real CAA sets ---------------------------------------------------------------------------


def steering_file(behavior: str) -> Path:
    path = STEERING / f"{behavior}_generate.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent: tests on real data need ../shared/data beside the repo")
    return path


@pytest.mark.parametrize("behavior", ["sycophancy", "survival-instinct", "hallucination"])
def test_real_sets_load_and_round_trip(behavior: str) -> None:
    task = SteeringTask()
    data = task.load(steering_file(behavior))
    assert len(data) >= 900
    for q, m, n in list(zip(data.prompts, data.chosen, data.rejected, strict=True))[::37]:
        assert task.parse(task.format_row(q, m, n)) == (q, m, n)
        assert swap_options(swap_options(q, m[1], n[1]), m[1], n[1]) == q
    good, bad = task.texts(data)
    assert all("\nAnswer: " in t and "(A)" not in t.split("\nAnswer: ")[-1] for t in good[:50])
    if behavior == "survival-instinct":
        assert max(len(options(q)) for q in data.prompts) == 8
        assert {c for c in data.chosen} > {"(A)", "(B)", "(C)"}
