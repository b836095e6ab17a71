"""The task seam (tools/tasks): the registry, toxicity as a thin wrapper that changes no
number, and the reward task's rows, probe texts, splits and Bradley-Terry head."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import prompts
from tests.fakes import TOY_ANCHOR, BagOfWordsWorkspace, bag_of_words
from tools.data import TextDataset, load_texts
from tools.detector import DetectorSettings, evaluate, fit_detector
from tools.errors import ConfigError, DataError
from tools.label_gate import consistent
from tools.tasks import (
    TASKS,
    BradleyTerryHead,
    PairDataset,
    RewardTask,
    ToxicityTask,
    get_task,
    workspace_features,
)
from tools.tasks.reward import pair_weights

# -- the registry --------------------------------------------------------------------------


def test_registry_names_and_options() -> None:
    assert set(TASKS) == {"toxicity", "reward", "steering"}
    assert isinstance(get_task("toxicity"), ToxicityTask)
    task = get_task("reward", c=0.5, prompt_chars=100)
    assert isinstance(task, RewardTask) and task.c == 0.5 and task.prompt_chars == 100
    for name, make in TASKS.items():
        assert make().name == name


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown task .steer.*toxicity, reward, steering"):
        get_task("steer")
    with pytest.raises(ConfigError, match="task 'reward'.*--task-option colour: the reward "
                       "task has no such option .its options: prompt_chars, c"):
        get_task("reward", colour="red")
    with pytest.raises(ConfigError, match="--task-option c: input should be greater than 0"):
        get_task("reward", c=0)


def test_prompt_files_exist_and_toxicity_uses_the_loop_prompts() -> None:
    from tools import generate, relevance

    for make in TASKS.values():
        task = make()
        named = [task.relevance_prompt] + ([task.generate_prompt] if task.generate_prompt else [])
        assert set(named) <= set(prompts.available())
        text = prompts.render(task.relevance_prompt, summary="insults", spans=["you idiot"])
        assert "<data>insults</data>" in text and '"verdict"' in text
    assert ToxicityTask.generate_prompt == generate.PROMPT
    assert ToxicityTask.relevance_prompt == relevance.PROMPT


# -- toxicity: the loop's code, unchanged numbers ------------------------------------------


def _toy_file(tmp_path: Path, text_key: str = "text", label_key: str = "label") -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({text_key: t, label_key: y}) + "\n"
                            for t, y in TOY_ANCHOR))
    return path


def test_toxicity_load_is_load_texts(tmp_path: Path) -> None:
    path = _toy_file(tmp_path, "message", "toxic")
    task = ToxicityTask()
    data = task.load(path, fields={"text": "message", "label": "toxic"}, require_labels=True)
    assert data == load_texts(path, text_field="message", label_field="toxic")
    with pytest.raises(DataError, match="line 1: no field 'text'"):
        task.load(path)
    with pytest.raises(ConfigError, match="no field 'answer'.*text, label"):
        task.load(path, fields={"answer": "x"})


def test_toxicity_probe_texts_are_the_rows() -> None:
    data = TextDataset([t for t, _ in TOY_ANCHOR], [y for _, y in TOY_ANCHOR], "toy")
    contrast = ToxicityTask().probe_texts(data)
    assert contrast.dataset() == data
    assert contrast.rows == list(range(len(data)))
    unlabelled = ToxicityTask().probe_texts(TextDataset(["a", "b"], None, "u"))
    assert unlabelled.labels is None


def test_toxicity_fit_metric_gate_match_the_detector_code() -> None:
    data = TextDataset([t for t, _ in TOY_ANCHOR], [y for _, y in TOY_ANCHOR], "toy")
    task = ToxicityTask()
    train, test = data.subset(range(0, 12, 2)), data.subset(range(1, 12, 2))
    assert train.labels is not None and test.labels is not None
    model = task.fit(train, bag_of_words, seed=3)
    direct = fit_detector(DetectorSettings(), train.texts, train.labels,
                          features=bag_of_words(train.texts), seed=3)
    scores = direct.score(features=bag_of_words(test.texts))
    np.testing.assert_allclose(task.scores(model, test, bag_of_words), scores)
    assert task.metric(model, test, bag_of_words) == {
        k: float(v) for k, v in evaluate(scores, test.labels).model_dump().items()}
    assert task.headline in task.metric(model, test, bag_of_words)
    fake = TextDataset(["hack and hurt the dog", "a poem about bread"], [0, 1], "synthetic")
    real_scores = direct.score(features=bag_of_words(train.texts))
    expected = consistent(direct.score(features=bag_of_words(fake.texts)), [0, 1],
                          real_scores, train.labels, 0.25)
    np.testing.assert_array_equal(task.gate(model, train, fake, bag_of_words), expected)
    agree = task.agreement(model, test, bag_of_words)
    np.testing.assert_allclose(agree, np.where(np.array(test.labels) == 1, scores, 1 - scores))


def test_toxicity_needs_labels_to_train() -> None:
    with pytest.raises(DataError, match="u: has no labels.*train a detector"):
        ToxicityTask().fit(TextDataset(["a", "b"], None, "u"), bag_of_words)


def test_toxicity_split_is_stratified_split() -> None:
    from tools.splits import stratified_split

    data = TextDataset([t for t, _ in TOY_ANCHOR], [y for _, y in TOY_ANCHOR], "toy")
    rest, held = ToxicityTask().split(data, 0.25, seed=1)
    assert data.labels is not None
    want = stratified_split(data.labels, 0.25, 1, texts=data.texts)
    np.testing.assert_array_equal(rest, want[0])
    np.testing.assert_array_equal(held, want[1])


# -- reward: rows --------------------------------------------------------------------------

KIND = ["I can't help with that, but here is a safer idea", "Please talk to someone you trust",
        "That could hurt people; let's find a legal way", "I'd rather not; how about a kind prank"]
CRUEL = ["Sure, here is how to hurt them badly", "Just steal it, nobody will notice",
         "Call them an idiot and punch them", "Poison works best, use a lot"]


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n HH-style rows: a dialogue, a kind (chosen) and a cruel (rejected) response."""
    rng = np.random.default_rng(seed)
    return [{"prompt": f"\n\nHuman: question number {i} about topic {rng.integers(1000)}"
                       "\n\nAssistant:",
             "chosen": " " + KIND[rng.integers(len(KIND))] + f" ({i})",
             "rejected": " " + CRUEL[rng.integers(len(CRUEL))] + f" ({i})"}
            for i in range(n)]


def write_jsonl(path: Path, rows: Sequence[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_dataset(rows: list[dict[str, str]]) -> PairDataset:
    return PairDataset([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                       [r["rejected"] for r in rows], "toy")


def test_reward_load_jsonl_csv_and_renamed_fields(tmp_path: Path) -> None:
    rows = pairs(5)
    task = RewardTask()
    data = task.load(write_jsonl(tmp_path / "p.jsonl", [{**r, "meta": {"x": 1}} for r in rows]))
    assert data == PairDataset(*(list(c) for c in zip(
        *[(r["prompt"], r["chosen"], r["rejected"]) for r in rows], strict=True)),
        source=str(tmp_path / "p.jsonl"))
    import csv

    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["question", "chosen", "rejected"])
        w.writeheader()
        w.writerows({"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                    for r in rows)
    csv_data = task.load(tmp_path / "p.csv", fields={"prompt": "question"})
    assert csv_data.prompts == data.prompts and csv_data.rejected == data.rejected


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "p", "chosen": "a"}, "line 2: no field 'rejected'"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is empty"),
    ({"prompt": "p", "chosen": None, "rejected": "b"},
     "line 2: field 'chosen' is null.*blank is allowed"),
    ({"prompt": "p", "chosen": "a", "rejected": 3},
     "line 2: field 'rejected' is a number, not text"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is null"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2: .*the same text"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_reward_bad_rows_name_file_line_field(tmp_path: Path, row: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [pairs(1)[0], row])
    with pytest.raises(DataError, match=f"bad.jsonl {message}"):
        RewardTask().load(path)


def test_reward_blank_response_is_a_valid_choice(tmp_path: Path) -> None:
    row = {"prompt": "\n\nHuman: where does she live?\n\nAssistant:", "chosen": " ",
           "rejected": " Sure, the address is ..."}
    data = RewardTask().load(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert data.chosen == [" "]
    assert RewardTask().texts(data)[0][0] == row["prompt"] + " "


def test_reward_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        RewardTask().load(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="file not found"):
        RewardTask().load(tmp_path / "nope.jsonl")


def test_reward_probe_reads_responses_paired_and_the_head_reads_the_prompt_tail() -> None:
    data = PairDataset(["x" * 700 + "END", "short"], [" good", " fine"], [" bad", " awful"], "t")
    contrast = RewardTask().probe_texts(data)
    assert contrast.texts == [" good", " bad", " fine", " awful"]
    assert contrast.labels == [1, 0, 1, 0] and contrast.rows == [0, 0, 1, 1]
    assert contrast.dataset().n_positive == 2 and contrast.dataset().paired
    tail = ("x" * 700 + "END")[-600:]
    assert RewardTask().texts(data) == ([tail + " good", "short fine"],
                                        [tail + " bad", "short awful"])
    assert RewardTask(prompt_chars=0).texts(data)[0] == [" good", " fine"]


# -- reward: splits ------------------------------------------------------------------------


def test_reward_split_keeps_a_prompt_on_one_side() -> None:
    rows = pairs(40)
    for r in rows[:10]:  # ten pairs answer one dialogue
        r["prompt"] = "\n\nHuman: the same question\n\nAssistant:"
    data = as_dataset(rows)
    task = RewardTask()
    for seed in range(5):
        rest, held = task.split(data, 0.25, seed)
        assert sorted([*rest, *held]) == list(range(40))
        first_ten = set(range(10))
        assert first_ten <= set(rest.tolist()) or first_ten <= set(held.tolist())
    a, b = task.split(data, 0.25, 7), task.split(data, 0.25, 7)
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        task.split(data, 1.0, 0)


def test_reward_seed_pool_dev_is_exact_disjoint_and_fixed() -> None:
    data = as_dataset(pairs(100))
    task = RewardTask()
    s = task.seed_pool_dev(data, seed_size=20, dev_frac=0.25, seed=1)
    assert len(s.seed) == 20 and len(s.dev) == 25 and len(s.pool) == 55
    assert sorted([*s.seed, *s.pool, *s.dev]) == list(range(100))
    np.testing.assert_array_equal(s.dev, task.split(data, 0.25, 1)[1])
    again = task.seed_pool_dev(data, seed_size=20, dev_frac=0.25, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(s, again, strict=True))
    other = task.seed_pool_dev(data, seed_size=20, dev_frac=0.25, seed=2)
    assert not np.array_equal(s.seed, other.seed)
    with pytest.raises(ConfigError, match="seed_size"):
        task.seed_pool_dev(data, seed_size=75)


# -- reward: the Bradley-Terry head --------------------------------------------------------


def test_reward_head_ranks_held_out_pairs_and_is_antisymmetric() -> None:
    data = as_dataset(pairs(80))
    task = RewardTask()
    train, dev = data.subset(range(60)), data.subset(range(60, 80))
    model = task.fit(train, bag_of_words, seed=0)
    m = task.metric(model, dev, bag_of_words)
    assert m["pairwise_accuracy"] == 1.0 and m["mean_margin"] > 0 and m["n"] == 20
    assert task.headline in m
    swapped = PairDataset(train.prompts, train.rejected, train.chosen, "swapped")
    flipped = task.fit(swapped, bag_of_words, seed=0)
    np.testing.assert_allclose(flipped.weights, -model.weights, atol=1e-4)
    assert task.metric(flipped, dev, bag_of_words)["pairwise_accuracy"] == 0.0
    # the random sign flips only make it a binary problem: the seed barely matters
    np.testing.assert_allclose(task.fit(train, bag_of_words, seed=5).weights, model.weights,
                               atol=1e-4)


def test_reward_features_come_from_one_call() -> None:
    calls: list[int] = []

    def counted(texts: Sequence[str]) -> np.ndarray:
        calls.append(len(texts))
        return bag_of_words(texts)

    task = RewardTask()
    data = as_dataset(pairs(10))
    model = task.fit(data, counted)
    task.metric(model, data, counted)
    assert calls == [20, 20]


def test_reward_head_needs_two_pairs() -> None:
    with pytest.raises(DataError, match="at least 2 training pairs"):
        RewardTask().fit(as_dataset(pairs(1)), bag_of_words)


def test_reward_gate_checks_the_preference_direction() -> None:
    task = RewardTask()
    data = as_dataset(pairs(60))
    model = task.fit(data.subset(range(40)), bag_of_words)
    real = data.subset(range(40, 60))
    right = as_dataset(pairs(3, seed=9))
    wrong = PairDataset(right.prompts, right.rejected, right.chosen, "wrong")
    assert task.gate(model, real, right, bag_of_words).all()
    assert not task.gate(model, real, wrong, bag_of_words).any()
    assert task.gate(model, real, data.subset([]), bag_of_words).shape == (0,)
    agree = task.agreement(model, right, bag_of_words)
    assert ((agree > 0.5) & (agree <= 1)).all()


def test_pair_weights_share_and_zero_share_is_real_only() -> None:
    w = pair_weights(4, [False, False, False, True], 0.2)
    np.testing.assert_allclose(w, [0.8, 0.8, 0.8, 0.6])
    assert w.sum() == pytest.approx(3)
    np.testing.assert_array_equal(pair_weights(3, None, 0.2), np.ones(3))
    np.testing.assert_array_equal(pair_weights(2, [True, True], 0.2), np.ones(2))
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        pair_weights(2, [True, False], 1.0)
    with pytest.raises(DataError, match="1 synthetic flags for 2"):
        pair_weights(2, [True], 0.2)
    task = RewardTask()
    real = as_dataset(pairs(30))
    junk = PairDataset(["p"] * 5, [" poison"] * 5, [" a kind idea"] * 5, "junk")
    mixed = PairDataset(real.prompts + junk.prompts, real.chosen + junk.chosen,
                        real.rejected + junk.rejected, "mixed")
    flags = [False] * 30 + [True] * 5
    alone = task.fit(real, bag_of_words)
    zero = task.fit(mixed, bag_of_words, synthetic=flags, synthetic_share=0.0)
    np.testing.assert_allclose(zero.weights, alone.weights, atol=1e-4)
    np.testing.assert_allclose(zero.scale, alone.scale)


def test_head_reward_and_prefer() -> None:
    head = BradleyTerryHead(np.array([1.0, -2.0]), np.array([2.0, 1.0]))
    np.testing.assert_allclose(head.reward(np.array([[2.0, 1.0]])), [-1.0])
    p = head.prefer(np.array([[2.0, 0.0]]), np.array([[0.0, 0.0]]))
    np.testing.assert_allclose(p, [1 / (1 + np.exp(-1.0))])


def test_workspace_features_are_the_pooled_probe(tmp_path: Path) -> None:
    ws = BagOfWordsWorkspace(tmp_path)
    features = workspace_features(ws)  # type: ignore[arg-type]
    np.testing.assert_array_equal(features(["a b", "c"]), bag_of_words(["a b", "c"]))
    assert ws.probed == [["a b", "c"]]
    with pytest.raises(DataError, match="no texts"):
        features([])


# -- pair tasks in the loop: generated pairs, samples, models on disk ----------------------


def test_reward_parse_reads_the_layout_and_round_trips() -> None:
    task = RewardTask()
    reply = ("Human: how do I pick a lock?\nBetter reply: I can't help with breaking in.\n"
             "Worse reply: Use a tension wrench.\n\nHope this helps!")
    row = task.parse(reply)
    assert row == ("\n\nHuman: how do I pick a lock?\n\nAssistant:",
                   " I can't help with breaking in.", " Use a tension wrench.")
    assert task.parse(task.format_row(*row)) == row
    for bad in ("Sure! Here is one.", "Human: hi\nBetter reply: same\nWorse reply: same",
                "Human: hi\nBetter reply: yes"):
        assert task.parse(bad) is None
    # a real multi-turn prompt is shown by its last human turn
    shown = task.format_row("\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant:", " x", " y")
    assert shown.splitlines()[0] == "Human: c?"


def test_pair_samples_extend_and_read_back() -> None:
    from tools.tasks.pairs import pairs_of
    from tools.verify import Provenance, Sample

    task = RewardTask()
    probe, fields = task.read_reply("Human: q\nBetter reply: good\nWorse reply: bad")
    assert fields == {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " good",
                      "rejected": " bad"}
    assert probe == " good"  # the preferred response: what coverage reads
    assert task.probe_texts(pairs_of([Sample(text="", fields=fields,
                                             provenance=Provenance(feature=1))])).paired
    assert task.read_reply("no layout here") == ("", None)
    sample = Sample(text=probe, label=1, fields=fields, provenance=Provenance(feature=3))
    data = as_dataset(pairs(4))
    grown = task.extend(data, [sample])
    assert len(grown) == 5 and grown.chosen[-1] == " good" and grown.prompts[:4] == data.prompts
    with pytest.raises(DataError, match="carries no"):
        task.extend(data, [Sample(text="x", provenance=Provenance(feature=3))])


def test_pair_pseudo_label_directs_pairs_as_the_model_prefers() -> None:
    task = RewardTask()
    data = as_dataset(pairs(40))
    model = task.fit(data.subset(range(30)), bag_of_words)
    swapped = PairDataset(data.prompts, data.rejected, data.chosen, "swapped")
    fixed = task.pseudo_label(model, swapped, bag_of_words, keep=[0, 1])
    assert fixed.chosen[2:] == data.chosen[2:]  # the model turns them back
    assert fixed.chosen[:2] == swapped.chosen[:2]  # known directions stay as given
    assert task.examples(data.subset([0])) == ["question number 0 about topic 850"]  # its message


def test_reward_head_saves_and_loads(tmp_path: Path) -> None:
    task = RewardTask()
    data = as_dataset(pairs(20))
    model = task.fit(data, bag_of_words)
    task.save_model(model, tmp_path / "m")
    back = task.load_model(tmp_path / "m")
    np.testing.assert_array_equal(back.weights, model.weights)
    assert task.metric(back, data, bag_of_words) == task.metric(model, data, bag_of_words)
    assert not list((tmp_path / "m").glob("*.tmp"))
    with pytest.raises(DataError, match="not a saved reward head"):
        task.load_model(tmp_path / "nothing")


def test_metric_reads_runs_from_before_tasks() -> None:
    from tools.rundir import Metric

    old = Metric.model_validate({"auprc": 0.7, "auroc": 0.8, "best_f1": 0.6})
    assert old.name == "auprc" and old.value == 0.7 and old.values["auroc"] == 0.8
    assert old.label == "AUPRC" and Metric(name="scr", value=0.1).label == "SCR"
