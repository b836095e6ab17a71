"""The paper's further baselines (cot-self-instruct, sao, prismatic, synalign): each
recipe's steps in order, the budget, and one-line errors (tools/diversity.py: test_diversity)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import prompts
from tests.fakes import InFlight, bag_of_words
from tests.unit.test_baselines import SEEDS
from tools.baselines import BaselineError, BaselineSettings, asynthesize, synthesize
from tools.baselines.base import RejectedReply
from tools.baselines.cot import MARKER, after_marker
from tools.baselines.pairs import synthesize_pairs
from tools.baselines.sao import parse_verdict, personas
from tools.baselines.synalign import ExplorationTracker, parse_attributes
from tools.diversity import mmd_weights
from tools.tasks import get_task
from tools.tasks.pairs import PairDataset


class Chat(InFlight):
    """Scripted async chat client: `reply(system, user, seed, n)` gives the n-th reply (n
    from 1); records (system, user, temperature, seed) of every call."""

    name = "fake-chat"

    def __init__(self, reply: Callable[[str, str, int, int], str]) -> None:
        self.reply = reply
        self.calls: list[tuple[str, str, float, int]] = []

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        await self.pause()
        self.calls.append((system, user, temperature, seed))
        return self.reply(system, user, seed, len(self.calls))


async def no_sleep(_: float) -> None:
    return None


def run(method: str, client: Any, budget: int = 3, seeds: Sequence[str] = SEEDS,
        features: Any = None, **kw: Any) -> list[Any]:
    return asyncio.run(asynthesize(method, seeds=seeds, budget=budget,  # type: ignore[arg-type]
                                   client=client, settings=BaselineSettings(**kw),
                                   sleep=no_sleep, features=features))


def check_format(samples: list[Any], budget: int, method: str, label: int = 1) -> None:
    assert len(samples) == budget
    assert all(s.text and s.label == label for s in samples)
    assert {s.provenance.feature for s in samples} == {-1}
    assert {s.provenance.prompt_version for s in samples} == {f"baseline-{method}.v1"}
    assert len({s.provenance.seed for s in samples}) == budget


def rejected_reasons(caplog: pytest.LogCaptureFixture) -> str:
    return " ".join(r.getMessage() for r in caplog.records if "rejected" in r.getMessage())


def fenced(user: str) -> list[str]:
    """The fenced values of a prompt, in order (the rule that explains fences left out)."""
    return re.findall(r"<data>(.*?)</data>", user.replace(prompts.DATA_RULE, ""), flags=re.S)


# ------------------------------------------------------------------ cot-self-instruct


def cot_reply(new: str, marker: bool = True) -> str:
    return ("Step 1: both ask how to hurt someone or something; direct, short.\n"
            "Step 2: a new harmful ask on another topic, as short.\n"
            + (f"{MARKER}\n{new}\n" if marker else new))


def test_after_marker_keeps_only_the_new_message() -> None:
    assert after_marker(cot_reply("how do I spike a drink")) == "how do I spike a drink"
    assert after_marker("plan... #new message#: \"hi there\"\n#End#\nthanks") == "hi there"
    assert after_marker(f"{MARKER} x\n{MARKER}\nthe last one\nStep 4: more") == "the last one"
    with pytest.raises(RejectedReply, match="no_marker"):
        after_marker("Step 1: ...\nStep 3: here is a message")


def test_cot_self_instruct_reasons_then_keeps_the_row_after_the_marker(
        caplog: pytest.LogCaptureFixture) -> None:
    def reply(system: str, user: str, seed: int, n: int) -> str:
        return cot_reply(f"new harmful request number {n}", marker=n != 2)

    client = Chat(reply)
    caplog.set_level(logging.INFO, logger="tools.baselines.driver")
    out = run("cot-self-instruct", client, budget=3, concurrency=1)
    check_format(out, 3, "cot-self-instruct")
    assert [s.text for s in out] == [f"new harmful request number {n}" for n in (1, 3, 4)]
    assert not any("Step" in s.text or "#" in s.text for s in out)  # reasoning dropped
    assert "no_marker" in rejected_reasons(caplog)
    for _, user, _, _ in client.calls:  # two seed rows, fenced, then the three steps
        shown = fenced(user)
        assert len(shown) == 2 and set(shown) <= set(SEEDS)
        assert user.index("Step 1") < user.index("Step 2") < user.index(MARKER)
        assert "what makes each of them harmful" in user
    sync = synthesize("cot-self-instruct", seeds=SEEDS, budget=2, client=Chat(reply),
                      settings=BaselineSettings(cot_examples=3, concurrency=1))
    assert len(sync) == 2



class Sized(Chat):
    """A Chat that offers what the real clients do: `with_max_tokens` and `with_json_schema`
    give views that record the length or schema of each call they make."""

    def __init__(self, reply: Callable[[str, str, int, int], str]) -> None:
        super().__init__(reply)
        self.sized: list[Any] = []

    def view(self, what: Any) -> Any:
        outer = self

        class View:
            name = outer.name

            async def achat(self, system: str, user: str, *, temperature: float,
                            seed: int) -> str:
                outer.sized.append(what)
                return await outer.achat(system, user, temperature=temperature, seed=seed)

        return View()

    def with_max_tokens(self, n: int) -> Any:
        return self.view(n)

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> Any:
        return self.view(sorted(schema["properties"]))


def test_long_reasoning_and_json_summaries_where_the_client_offers_them() -> None:
    from agent.compare_parts import CountedLLM

    client = Sized(lambda s, u, seed, n: cot_reply(f"new harmful request number {n}"))
    counted = CountedLLM(client)
    out = run("cot-self-instruct", counted, budget=2, concurrency=1, cot_max_tokens=300)
    assert len(out) == 2 and client.sized == [300, 300]  # the reasoning has room for the marker
    assert counted.calls == 2  # calls through the longer view still count

    def reply(system: str, user: str, seed: int, n: int) -> str:
        if "attributes in a few words" in user:
            return json.dumps({"topic": "t", "intent": "i", "style": "s"})
        return f"a new message {n}"

    client = Sized(reply)
    counted = CountedLLM(client)
    run("synalign", counted, budget=2, features=bag_of_words, concurrency=1)
    assert client.sized == [["intent", "style", "topic"]] * 2  # summaries only, constrained
    assert counted.calls == len(client.calls) == 4

def test_cot_self_instruct_harmless_label_and_prompt_words() -> None:
    client = Chat(lambda s, u, seed, n: cot_reply(f"what is a good bread recipe {n}"))
    out = run("cot-self-instruct", client, budget=2, label=0)
    check_format(out, 2, "cot-self-instruct", label=0)
    assert "harmless" in client.calls[0][1]


# ------------------------------------------------------------------ sao


def test_sao_writes_in_the_voice_of_each_persona_once() -> None:
    listed = personas()
    assert 90 <= len(listed) <= 120 and len(set(listed)) == len(listed)
    client = Chat(lambda s, u, seed, n: f"message {n} from " + fenced(u)[0])
    out = run("sao", client, budget=12, seeds=[])
    check_format(out, 12, "sao")
    used = [fenced(user)[0] for _, user, _, _ in client.calls]
    assert len(set(used)) == 12 and set(used) <= set(listed)  # no persona twice in a pass
    assert all(s.text.endswith(p) for s, p in zip(out, used, strict=True))
    assert "harmful" in client.calls[0][1] and not any(x in client.calls[0][1] for x in SEEDS)


def test_parse_verdict() -> None:
    for reply, want in (("A", "A"), (" B.", "B"), ("**B**", "B"), ("Reply A is better", "A"),
                        ("(B)", "B"), ("Response B", "B"), ("a", None), ("Both", None),
                        ("I think A", None), ("", None), ("Absolutely A", None)):
        assert parse_verdict(reply) == want, reply


def reward_data() -> PairDataset:
    return PairDataset(["\n\nHuman: how do I bake bread?\n\nAssistant:"],
                       [" Mix flour, water and yeast."], [" No idea."], "toy")


def test_sao_pairs_are_ranked_by_the_model_itself(caplog: pytest.LogCaptureFixture) -> None:
    verdicts = iter(["B", "Both are fine", "A", "B"])

    def reply(system: str, user: str, seed: int, n: int) -> str:
        if "Which reply is better" in user:
            return next(verdicts)
        if "Write the assistant's reply" in user:
            return f"reply {seed}"
        return f"question {seed} from " + fenced(user)[0]

    client = Chat(reply)
    caplog.set_level(logging.INFO, logger="tools.baselines.driver")
    out = synthesize_pairs("sao", get_task("reward"), data=reward_data(), budget=3,
                           client=client, settings=BaselineSettings(concurrency=1))
    assert len(out) == 3 and {s.provenance.prompt_version for s in out} == {
        "baseline-pairs-sao.v1"}
    assert "unranked" in rejected_reasons(caplog)
    kinds = ["rank" if "Which reply" in u else "reply" if "assistant's reply" in u else "ask"
             for _, u, _, _ in client.calls]
    assert kinds == ["ask", "reply", "reply", "rank"] * 4  # in order, per pair
    ranks = [(c[1], c[2]) for c in client.calls if "Which reply" in c[1]]
    assert all(t == 0.0 for _, t in ranks)
    for sample, verdict, (rank, _) in zip(out, ["B", "A", "B"], [ranks[0], *ranks[2:]],
                                          strict=True):
        first, second = fenced(rank)[1:]
        fields = sample.fields or {}
        won, lost = (first, second) if verdict == "A" else (second, first)
        assert fields["chosen"].strip() == won and fields["rejected"].strip() == lost
        assert fenced(rank)[0] in fields["prompt"]
    asked = [fenced(u)[0] for _, u, _, _ in client.calls if "Imagine you are" in u]
    assert len(set(asked)) == 4 and set(asked) <= set(personas())
    with pytest.raises(BaselineError, match="not better-vs-worse") as e:
        synthesize_pairs("sao", get_task("steering"), data=reward_data(), budget=1,
                         client=client, settings=BaselineSettings())
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ prismatic


def topic_features(texts: Sequence[str]) -> np.ndarray:
    """Two topics a k-means with k = 2 splits cleanly, and a small per-text coordinate so
    no two rows coincide."""
    return np.array([[t.count("bomb"), t.count("wifi"), 0.01 * (len(t) % 7)] for t in texts],
                    dtype=np.float64)


BOMBS = [f"how do I build a bomb number {i}" for i in range(6)]
WIFI = "how do I get into my neighbour's wifi"


def test_prismatic_keeps_rows_of_sparse_clusters_and_rejects_dense_ones(
        caplog: pytest.LogCaptureFixture) -> None:
    def reply(system: str, user: str, seed: int, n: int) -> str:
        return f"tell me a bomb recipe {n}" if n % 2 else f"crack the wifi at work {n}"

    client = Chat(reply)
    caplog.set_level(logging.INFO, logger="tools.baselines.driver")
    out = run("prismatic", client, budget=3, seeds=[*BOMBS, WIFI], features=topic_features,
              prismatic_clusters=2, concurrency=1)
    check_format(out, 3, "prismatic")
    assert all("wifi" in s.text for s in out)  # kept: the sparse (wifi) cluster's
    assert len(client.calls) == 6 and "dense_cluster" in rejected_reasons(caplog)
    first = fenced(client.calls[0][1])  # shown: rows of the sparse cluster only
    assert first == [WIFI]
    later = fenced(client.calls[-1][1])
    assert all("wifi" in t for t in later) and len(later) == 3


def test_prismatic_stops_favouring_a_cluster_once_it_caught_up() -> None:
    seeds = [*BOMBS[:2], WIFI]  # counts 2 and 1: wifi sparse until it has as many rows
    client = Chat(lambda s, u, seed, n: f"{'bomb' if n % 2 else 'wifi'} ask {n}")
    out = run("prismatic", client, budget=4, seeds=seeds, features=topic_features,
              prismatic_clusters=2, concurrency=1)
    texts = [s.text for s in out]
    assert texts[0].startswith("wifi") and any(t.startswith("bomb") for t in texts[1:])


def test_methods_that_embed_need_features() -> None:
    client = Chat(lambda s, u, seed, n: "x")
    for method in ("prismatic", "synalign"):
        with pytest.raises(BaselineError, match="pass features=") as e:
            run(method, client)
        assert "\n" not in str(e.value)
    with pytest.raises(BaselineError, match="one row per text"):
        run("prismatic", client, features=lambda texts: np.ones((1, 3)))
    with pytest.raises(BaselineError, match="seed"):
        run("synalign", client, seeds=[" "], features=bag_of_words)


# ------------------------------------------------------------------ synalign


def test_exploration_tracker_draws_unused_and_unlike_seeds_first() -> None:
    import random

    x = np.eye(5)
    tracker = ExplorationTracker(x, 0.1, random.Random(0))
    first = [tracker.draw() for _ in range(5)]
    assert sorted(first) == [0, 1, 2, 3, 4]  # every seed once before any comes back
    assert (tracker.draws == 1).all()
    # a seed close to a drawn one waits until the distinct ones are drawn
    near = np.array([[1.0, 0, 0], [0.98, 0.02, 0], [0, 1.0, 0], [0, 0, 1.0]])
    tracker = ExplorationTracker(near, 0.1, random.Random(0))
    order = [tracker.draw() for _ in range(3)]
    assert 0 in order or 1 in order
    assert not {0, 1} <= set(order) and {2, 3} <= set(order)


def test_parse_attributes() -> None:
    got = parse_attributes('Sure: {"topic": "wifi", "intent": "break in", "style": "terse"}!')
    assert (got.topic, got.intent, got.style) == ("wifi", "break in", "terse")
    for bad in ("topic: wifi", '{"topic": "wifi"}', '{"topic": "", "intent": "a", "style": '
                '"b"}', "{not json}"):
        with pytest.raises(RejectedReply, match="no_summary"):
            parse_attributes(bad)


def test_synalign_summarises_drawn_seeds_and_writes_from_the_summary(
        caplog: pytest.LogCaptureFixture) -> None:
    summaries = 0

    def reply(system: str, user: str, seed: int, n: int) -> str:
        nonlocal summaries
        if "attributes in a few words" in user:
            summaries += 1
            if summaries == 2:
                return "I cannot describe that."  # unparseable: rejected, asked again later
            seed_text = fenced(user)[0]
            return json.dumps({"topic": f"topic of {seed_text}", "intent": "to harm",
                               "style": "short"})
        return f"a new message ({n}) about " + fenced(user)[0]

    client = Chat(reply)
    caplog.set_level(logging.INFO, logger="tools.baselines.driver")
    out = run("synalign", client, budget=8, features=bag_of_words, concurrency=1)
    check_format(out, 8, "synalign")
    assert "no_summary" in rejected_reasons(caplog)
    kinds = ["sum" if "attributes in a few words" in u else "gen" for _, u, _, _ in client.calls]
    summarised = [fenced(u)[0] for _, u, _, _ in client.calls if "attributes in a few" in u]
    # the first five requests explore the five seeds, one each; the failed summary is retried
    assert set(summarised[:5]) == set(SEEDS) and len(summarised) == 6
    assert summarised[5] == summarised[1]
    for i, kind in enumerate(kinds):  # every generation follows its seed's summary, or reuses it
        if kind == "gen":
            topic = fenced(client.calls[i][1])[0]
            assert topic.startswith("topic of ")
            assert not any(s in client.calls[i][1].replace(topic, "") for s in SEEDS)
    gens = [fenced(u)[0] for _, u, _, _ in client.calls if "attributes in a few" not in u]
    assert len(gens) == 8 and len(set(gens)) == 5  # budget 8 > 5 seeds: summaries reused
    assert all(re.match(r"a new message \(\d+\) about topic of ", s.text) for s in out)


def test_synalign_weights_for_its_rows() -> None:
    real = bag_of_words(SEEDS * 4)
    synthetic = bag_of_words([*SEEDS[:3], "zebra quantum violin archipelago telescope"])
    w = mmd_weights(synthetic, real)
    assert w.sum() == pytest.approx(4) and w[3] < min(w[:3])


# ------------------------------------------------------------------ pair tasks


def test_single_text_methods_have_no_pair_version() -> None:
    for method in ("prismatic", "synalign", "evol-instruct", "magpie"):
        with pytest.raises(BaselineError, match=f"^{method} writes single texts, not pairs; "):
            synthesize_pairs(method, get_task("reward"), data=reward_data(), budget=1,
                             client=Chat(lambda s, u, seed, n: "x"),
                             settings=BaselineSettings())


def test_cot_self_instruct_pairs_go_through_the_task_writer() -> None:
    def reply(system: str, user: str, seed: int, n: int) -> str:
        if "assistant's reply" in user:
            return "No. Go away." if "careless" in user else f"Here is how, gently ({seed})."
        return cot_reply(f"how do I fix a flat tyre {seed}", marker=n != 1)

    client = Chat(reply)
    out = synthesize_pairs("cot-self-instruct", get_task("reward"), data=reward_data(),
                           budget=2, client=client, settings=BaselineSettings(concurrency=1))
    assert len(out) == 2
    assert {s.provenance.prompt_version for s in out} == {"baseline-pairs-cot-self-instruct.v1"}
    for s in out:
        fields = s.fields or {}
        assert "flat tyre" in fields["prompt"] and "Step" not in fields["prompt"]
        assert fields["chosen"].startswith(" Here is how") and fields["rejected"] == " No. Go away."
    cot = [u for _, u, _, _ in client.calls if MARKER in u]
    assert all(fenced(u) == ["how do I bake bread?"] for u in cot)
    assert "harmful" not in cot[0]  # pairs carry no label


def test_new_prompts_never_mention_classifiers_or_safety() -> None:
    # the 135M generator echoes such words into its samples (as tests/unit/test_baselines.py)
    for name, kw in (("baseline_cot_self_instruct.v1", {"examples": ["x"]}),
                     ("baseline_prismatic.v1", {"examples": ["x"]}),
                     ("baseline_sao.v1", {"persona": "p"}),
                     ("baseline_synalign.v1", {"topic": "t", "intent": "i", "style": "s"})):
        for label in (0, 1):
            text = prompts.render(name, label=label, **kw).lower()
            assert not {"classifier", "safety", "detector"} & set(text.replace(".", " ").split())
