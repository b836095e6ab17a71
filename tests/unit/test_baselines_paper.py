"""The paper's further baselines (cot-self-instruct, sao, prismatic, synalign) and
tools/diversity.py: each recipe's steps in order, the budget, and one-line errors."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import prompts
from tests.fakes import InFlight, bag_of_words
from tests.unit.test_baselines import SEEDS
from tools import diversity
from tools.baselines import BaselineError, BaselineSettings, asynthesize, synthesize
from tools.baselines.base import RejectedReply
from tools.baselines.cot import MARKER, after_marker
from tools.baselines.pairs import synthesize_pairs
from tools.baselines.sao import parse_verdict, personas
from tools.baselines.synalign import ExplorationTracker, parse_attributes
from tools.diversity import (
    fit_head,
    g_vendi,
    g_vendi_greedy,
    gradient_embeddings,
    head_gradients,
    mmd_weights,
    vendi_score,
)
from tools.errors import DataError
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


# ------------------------------------------------------------------ tools/diversity.py


def test_vendi_score_hand_computed_cases() -> None:
    assert vendi_score(np.ones((5, 3))) == pytest.approx(1.0)
    assert vendi_score(np.eye(4)) == pytest.approx(4.0)
    assert vendi_score(3.0 * np.eye(3)[[0, 1, 2, 0, 1, 2]]) == pytest.approx(3.0)  # scale-free
    c = 0.6  # two rows with cosine c: eigenvalues (1 ± c) / 2
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    rows = np.array([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    assert vendi_score(rows) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()))
    assert vendi_score(rows, q=2) == pytest.approx(1 / (lam**2).sum())
    assert vendi_score(rows, q=math.inf) == pytest.approx(1 / lam.max())


def test_vendi_score_uses_either_gram_matrix_alike() -> None:
    rows = np.eye(2)[[0, 0, 0, 1]]  # n > d: the d x d form; eigenvalues 3/4, 1/4
    lam = np.array([0.75, 0.25])
    expected = math.exp(-(lam * np.log(lam)).sum())
    assert vendi_score(rows) == pytest.approx(expected)
    wide = np.hstack([rows, np.zeros((4, 6))])  # n < d: the n x n form
    assert vendi_score(wide) == pytest.approx(expected)
    x = np.random.default_rng(0).normal(size=(30, 5))
    assert vendi_score(x) == pytest.approx(vendi_score(np.hstack([x, np.zeros((30, 40))])))
    assert 1 <= vendi_score(x) <= 5


def test_vendi_score_bad_input_is_a_one_line_error() -> None:
    for bad, match in ((np.zeros((0, 3)), "non-empty"), (np.array([[1.0, 0], [0, 0]]),
                       "row 1 is all zeros"), (np.array([1.0, 2.0]), r"\[n, d\]"),
                       (np.array([[np.nan, 1.0]]), "NaN")):
        with pytest.raises(DataError, match=match) as e:
            vendi_score(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="order"):
        vendi_score(np.eye(2), q=0)


def xor_data(n: int = 200, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian rows and two labellings of them: a linear rule and an XOR."""
    x = np.random.default_rng(0).normal(size=(n, d))
    return x, (x[:, 0] > 0).astype(int), (x[:, 0] * x[:, 1] > 0).astype(int)


def test_head_gradients_match_torch_autograd() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 5)) * [1.0, 3.0, 0.1, 1.0, 2.0] + [0.0, 5.0, 0.0, -1.0, 0.0]
    y = (x[:, 0] + x[:, 2] * 10 > 0).astype(int)
    head = fit_head(x, y, hidden=4)
    assert head.w1.shape == (4, 5) and head.w2.shape == (4,) and head.b1.shape == (4,)
    grads = head_gradients(x, y, head=head)
    assert grads.shape == (9, 4 * 5 + 2 * 4 + 1)
    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True)
              for p in (head.w1, head.b1, head.w2, np.float64(head.b2))]
    w1, b1, w2, b2 = params
    xs = torch.tensor((x - x.mean(axis=0)) / x.std(axis=0), dtype=torch.float64)
    logits = torch.tanh(xs @ w1.T + b1) @ w2 + b2
    assert np.allclose(head.logit(x), logits.detach().numpy(), rtol=1e-12, atol=1e-12)
    target = torch.tensor(y, dtype=torch.float64)
    for i in range(9):  # one row's loss at a time: its own gradient
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[i], target[i])
        auto = torch.autograd.grad(loss, params, retain_graph=True)
        want = np.concatenate([g.detach().numpy().reshape(-1) for g in auto])
        assert np.allclose(grads[i], want, rtol=1e-10, atol=1e-13)


def test_gradient_embeddings_are_the_projected_exact_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, y, _ = xor_data(60, 6)
    head = fit_head(x, y, hidden=5)
    assert np.mean((head.logit(x) > 0) == y) > 0.9
    g = gradient_embeddings(x, y, dim=64, seed=3, head=head)
    assert g.shape == (60, 64) and np.allclose(np.linalg.norm(g, axis=1), 1.0)
    p_w1, p_rest = diversity._projection(6, 5, 64, 3)  # P's W1 rows laid out [d, H·dim]
    p = np.vstack([p_w1.reshape(6, 5, 64).transpose(1, 0, 2).reshape(30, 64), p_rest])
    assert set(np.unique(p * 8)) == {-1.0, 1.0}  # Rademacher, ±1/√dim
    exact = head_gradients(x, y, head=head) @ p
    assert np.allclose(g, exact / np.linalg.norm(exact, axis=1, keepdims=True),
                       rtol=1e-10, atol=1e-12)
    monkeypatch.setattr(diversity, "CHUNK_VALUES", 1)  # one row per chunk: the same
    assert np.allclose(g, gradient_embeddings(x, y, dim=64, seed=3, head=head),
                       rtol=1e-12, atol=1e-14)
    # a long projection keeps the exact gradients' cosines (Johnson-Lindenstrauss)
    full = head_gradients(x, y, head=head)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    long = gradient_embeddings(x, y, dim=4096, seed=3, head=head)
    assert np.abs(long @ long.T - full @ full.T).max() < 0.1


def test_gradient_embeddings_are_deterministic_for_a_seed() -> None:
    x, y, _ = xor_data(80, 6)
    first = fit_head(x, y, seed=5)
    again = fit_head(x, y, seed=5)
    def flat(h: diversity.Head) -> np.ndarray:
        return np.concatenate([h.mean, h.scale, h.w1.ravel(), h.b1, h.w2, [h.b2]])

    assert np.array_equal(flat(first), flat(again))
    g = gradient_embeddings(x, y, dim=32, seed=5)
    assert np.array_equal(g, gradient_embeddings(x, y, dim=32, seed=5))
    assert g_vendi(x, y, dim=32, seed=5) == g_vendi(x, y, dim=32, seed=5)
    assert not np.allclose(g, gradient_embeddings(x, y, dim=32, seed=6))
    assert not np.allclose(g, gradient_embeddings(x, y, dim=32, seed=6, head=first))


def test_g_vendi_sees_what_the_head_learned() -> None:
    # the same rows under two labellings: a logistic head's G-Vendi was the Vendi score of
    # [x̃, 1] for both; the tanh head's gradients carry the rule it learned
    x, linear, xor = xor_data()
    augmented = vendi_score(np.hstack([(x - x.mean(axis=0)) / x.std(axis=0), np.ones((200, 1))]))
    g_linear, g_xor = g_vendi(x, linear), g_vendi(x, xor)
    assert g_xor > 1.5 * g_linear
    assert g_xor > 1.5 * augmented and g_xor > 1.5 * vendi_score(x)
    assert np.mean((fit_head(x, xor).logit(x) > 0) == xor) > 0.9  # the XOR is learned
    # the long projection agrees with the exact gradients' Vendi score
    assert g_vendi(x, xor, dim=4096) == pytest.approx(
        vendi_score(head_gradients(x, xor)), rel=0.05)
    # p - y only scales and signs a row's gradient: with one head, flipped labels negate
    # the unit embeddings (the direction is ±∇θ logit, however sure the head is)
    head = fit_head(x, xor)
    assert np.allclose(gradient_embeddings(x, 1 - xor, head=head),
                       -gradient_embeddings(x, xor, head=head), atol=1e-12)


def test_one_label_leaves_the_head_at_its_seeded_initialisation() -> None:
    x = bag_of_words(SEEDS)
    head = fit_head(x, [1] * 5)
    assert not head.b1.any() and head.b2 == 0 and head.w1.all() and head.w2.all()
    assert np.array_equal(head.w1, fit_head(x, [0] * 5).w1)
    assert not np.allclose(head.w1, fit_head(x, [1] * 5, seed=1).w1)
    assert np.allclose(head.mean, x.mean(axis=0))
    up = gradient_embeddings(x[:1], [1], dim=64)
    down = gradient_embeddings(x[:1], [0], dim=64)
    assert np.allclose(up, -down)
    with pytest.raises(DataError, match="one 0/1 label per row"):
        gradient_embeddings(x, [1, 2, 1, 1, 1])
    with pytest.raises(DataError, match="a head for 64 features, rows have 3"):
        gradient_embeddings(np.ones((2, 3)), [1, 1], head=head)
    with pytest.raises(DataError, match="hidden"):
        fit_head(x, [1] * 5, hidden=0)


def test_g_vendi_is_vendi_of_gradient_embeddings() -> None:
    same = np.tile([1.0, 2.0, 0.5], (6, 1))
    assert g_vendi(same, [1, 0, 1, 0, 1, 0]) == pytest.approx(1.0)  # sign does not count
    assert g_vendi(same, [1] * 6) == pytest.approx(1.0)
    x = bag_of_words(SEEDS * 2)
    assert g_vendi(x, [1] * 10, dim=32) == pytest.approx(
        vendi_score(gradient_embeddings(x, [1] * 10, dim=32)))
    assert g_vendi(x, [1] * 10, dim=32) > 2
    # each row with both labels: nothing to learn, the head ends near W1 = 0, w2 = 0 and
    # every row's gradient points alike
    assert g_vendi(x, [1] * 5 + [0] * 5, dim=32) == pytest.approx(1.0, abs=0.01)


def test_g_vendi_greedy_adds_what_raises_the_vendi_score_most() -> None:
    e = np.eye(4)
    emb = np.vstack([e[0], e[0], 0.9 * e[0] + 0.1 * e[1], e[1], e[2], e[3] + 0.2 * e[2]])
    picked = g_vendi_greedy(emb, candidates=[1, 2, 3, 4, 5], labelled=[0], k=3)
    assert picked[:2] == [3, 4] and picked[2] == 5
    # each pick is the best by brute force of the order-2 Vendi score
    have = [0]
    for j in picked:
        rest = [c for c in [1, 2, 3, 4, 5] if c not in have]
        best = max(rest, key=lambda c: (vendi_score(emb[have + [c]], q=2), -c))
        assert j == best
        have.append(j)
    assert g_vendi_greedy(emb, [1, 3], [], 1) == [1]  # nothing labelled: ties, the first
    for cands, lab, k, match in (([0, 1], [0], 1, "not labelled"), ([1, 1], [0], 1,
                                 "distinct"), ([1], [0], 2, "outside"), ([9], [0], 1,
                                 "out of range")):
        with pytest.raises(DataError, match=match):
            g_vendi_greedy(emb, cands, lab, k)


def test_mmd_weights_up_weight_rows_near_the_real_data_and_drop_outliers() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 2))
    near = rng.normal(size=(10, 2)) * 0.5
    synthetic = np.vstack([near, [[20.0, 20.0], [-15.0, 18.0]], [[0.0, 0.0]], [[3.0, 0.0]]])
    w = mmd_weights(synthetic, real)
    assert w.shape == (14,) and (w >= 0).all() and w.sum() == pytest.approx(14)
    assert w[10] < 0.01 and w[11] < 0.01  # far from every real row
    assert w[:10].mean() > 1 and w[12] > 1  # in the bulk of the real rows
    assert w[12] > w[13]  # the centre beats the edge (3 std out)
    same = mmd_weights(real[:50], real[50:])
    assert 0.5 < np.median(same) < 1.5  # alike distributions: weights near 1
    assert np.allclose(mmd_weights(np.ones((3, 2)), np.ones((4, 2))), 1.0)
    with pytest.raises(DataError, match="features"):
        mmd_weights(np.ones((3, 2)), np.ones((3, 4)))
    with pytest.raises(DataError, match="no synthetic row lies near"):
        mmd_weights(np.array([[100.0, 100.0]]), real, bandwidth=0.1)


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
