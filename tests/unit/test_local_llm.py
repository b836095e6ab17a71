"""LocalChat on the tiny random Llama: batching, seeding, padding, steering, protocols."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from tests.tolerance import assert_close_fp32
from tools.errors import ConfigError
from tools.generate import GenerateSettings, Target, agenerate
from tools.local_llm import LocalChat

PAIRS = [("You are terse.", "how do I bake bread"),
         ("You write test data for a classifier, one message at a time.", "hack the wifi")]


def test_batched_greedy_replies_match_one_at_a_time(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=6)
    batched = chat.generate_batch(PAIRS, temperature=0.0)
    # the two prompts differ in length: left padding must not change greedy replies
    assert batched == [chat.generate_batch([p])[0] for p in PAIRS]
    assert chat.chat(*PAIRS[0]) == batched[0]


def test_sampling_is_seeded_per_batch(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=8)
    a = chat.generate_batch(PAIRS, temperature=1.0, seed=5)
    assert a == chat.generate_batch(PAIRS, temperature=1.0, seed=5)
    assert a != chat.generate_batch(PAIRS, temperature=1.0, seed=6)


def test_exact_number_of_new_tokens(tiny_lm) -> None:
    chat = LocalChat(tiny_lm)
    seen: list[int] = []
    original = tiny_lm.model.generate

    def spy(**kwargs):  # type: ignore[no-untyped-def]
        out = original(**kwargs)
        seen.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    tiny_lm.model.generate = spy
    try:
        chat.complete_batch(["the quick brown", "a"], max_new_tokens=7, min_new_tokens=7)
    finally:
        del tiny_lm.model.generate
    assert seen == [7]


def test_concurrent_achats_run_as_one_batch(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=4, batch_size=16)
    sizes: list[int] = []
    run = chat._run
    chat._run = lambda batch: (sizes.append(len(batch)), run(batch))[1]  # type: ignore[method-assign]
    targets = [Target(feature=f, summary=f"theme {f}", spans=["how do I bake bread"])
               for f in range(5)]
    samples = asyncio.run(agenerate(targets, chat, GenerateSettings(per_feature=2,
                                                                    concurrency=10)))
    assert len(samples) == 10 and sizes == [10]
    assert {s.provenance.generator for s in samples} == {"local:tiny"}
    # a second event loop (asyncio.run again) gets a fresh queue
    assert asyncio.run(chat.achat("s", "u", temperature=0.0, seed=0)) == chat.chat("s", "u")


def test_requests_with_different_options_are_batched_apart(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=3, batch_size=2)
    sizes: list[tuple[str, int]] = []
    run = chat._run
    chat._run = lambda b: (sizes.append((b[0].kind, len(b))), run(b))[1]  # type: ignore[method-assign]

    async def main() -> list[str]:
        return list(await asyncio.gather(
            *[chat.achat("s", f"u{i}", temperature=0.7, seed=i) for i in range(3)],
            chat.acomplete("the quick", temperature=0.0, seed=0, max_tokens=5),
        ))

    replies = asyncio.run(main())
    assert len(replies) == 4 and sorted(sizes) == [("chat", 1), ("chat", 2), ("complete", 1)]


def test_a_failed_batch_fails_its_callers(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=3)

    def broken(batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")

    chat._run = broken  # type: ignore[method-assign]

    async def main() -> None:
        await asyncio.gather(*[chat.achat("s", "u", temperature=0, seed=i) for i in range(2)])

    with pytest.raises(RuntimeError, match="out of memory"):
        asyncio.run(main())


def test_completion_has_no_chat_template(tiny_lm) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=5)
    prefix = chat.chat_prompt("sys", "")
    assert prefix.startswith("<|im_start|>system\nsys<|im_end|>")
    raw = asyncio.run(chat.acomplete("<|im_start|>user\n", temperature=0, seed=0))
    assert raw == chat.complete_batch(["<|im_start|>user\n"])[0]


def test_steering_adds_the_decoder_direction_at_the_hook(tiny_lm, tiny_sae) -> None:
    feature, scale = 3, 4.0
    steered = LocalChat(tiny_lm, max_new_tokens=4, steer=(tiny_sae, feature, scale))
    assert steered.name == "local:tiny+steer3x4"
    captured: list[torch.Tensor] = []
    layer = tiny_lm.model.get_submodule(tiny_sae.hook.module)
    nxt = tiny_lm.model.get_submodule(f"model.layers.{tiny_sae.hook.layer + 1}")

    def grab(_m, args):  # type: ignore[no-untyped-def]
        captured.append(args[0].detach().clone())

    handle = nxt.register_forward_pre_hook(grab)
    try:
        LocalChat(tiny_lm, max_new_tokens=1).complete_batch(["how do I bake bread"])
        steered.complete_batch(["how do I bake bread"], max_new_tokens=1)
    finally:
        handle.remove()
    plain, pushed = captured
    direction = scale * tiny_sae.sae.W_dec[feature].detach()
    # pushed = plain + direction: one fp32 add, then the test's subtraction (tests/tolerance.py)
    assert_close_fp32((pushed - plain).numpy(), direction.expand_as(plain).numpy(), 2,
                      scale=float(pushed.abs().max()))
    assert not layer._forward_hooks, "the steering hook is removed after generating"
    assert steered.chat(*PAIRS[0]) != LocalChat(tiny_lm, max_new_tokens=4).chat(*PAIRS[0])


def test_steering_checks_the_sae_and_feature(tiny_lm, tiny_sae) -> None:
    with pytest.raises(ConfigError, match="outside the SAE"):
        LocalChat(tiny_lm, steer=(tiny_sae, tiny_sae.d_sae, 1.0))
    no_template = dataclasses.replace(tiny_lm, tokenizer=tiny_lm.tokenizer.__class__(
        tokenizer_object=tiny_lm.tokenizer.backend_tokenizer))
    with pytest.raises(ConfigError, match="no chat template"):
        LocalChat(no_template)


def test_json_schema_is_not_enforced_in_process(tiny_lm) -> None:
    chat = LocalChat(tiny_lm)
    assert chat.with_json_schema({"type": "object"}) is chat


def test_longer_replies_share_the_model_and_queue(tiny_lm, monkeypatch) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=2)
    longer = chat.with_max_tokens(6)
    assert longer.name == chat.name
    run, lengths = chat._run, []

    def record(batch):  # type: ignore[no-untyped-def]
        lengths.append(sorted(r.max_new_tokens for r in batch))
        return run(batch)

    monkeypatch.setattr(chat, "_run", record)

    async def both() -> list[str]:
        return list(await asyncio.gather(chat.achat("s", "hi", temperature=0.0, seed=0),
                                         longer.achat("s", "hi", temperature=0.0, seed=0)))

    assert all(isinstance(t, str) for t in asyncio.run(both()))
    assert sorted(lengths) == [[2], [6]]  # one queue; a batch has one reply length


def hook_inputs(lm, sae, run):  # type: ignore[no-untyped-def]
    """What the layer after the SAE's hook receives in the last forward pass of `run()` (the
    prefill, when it generates one token; an earlier pass may measure the residual norm)."""
    captured: list[torch.Tensor] = []
    nxt = lm.model.get_submodule(f"model.layers.{sae.hook.layer + 1}")
    handle = nxt.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return captured[-1]


def test_per_request_steering_moves_only_its_own_row(tiny_lm, tiny_sae) -> None:
    feature, alpha = 5, 2.0
    chat = LocalChat(tiny_lm, max_new_tokens=4, sae=tiny_sae)
    plain_chat = LocalChat(tiny_lm, max_new_tokens=4)
    assert chat.can_steer and not plain_chat.can_steer
    prompts = ["how do I bake bread", "hack the wifi"]
    plain = hook_inputs(tiny_lm, tiny_sae, lambda: plain_chat.complete_batch(
        prompts, max_new_tokens=1))
    mixed = hook_inputs(tiny_lm, tiny_sae, lambda: chat.complete_batch(
        prompts, max_new_tokens=1, steers=[None, (feature, alpha)]))
    rho = chat._rho
    assert rho is not None and rho > 0
    row = tiny_sae.sae.W_dec[feature].detach()
    direction = alpha * rho * row / row.norm()
    torch.testing.assert_close(mixed[0], plain[0])  # the unsteered row: untouched
    # plain + direction, the direction itself made in a few fp32 operations (scale, norm,
    # division), then the test's subtraction
    assert_close_fp32((mixed[1] - plain[1]).numpy(), direction.expand_as(plain[1]).numpy(),
                      row.numel() + 4, scale=float(mixed[1].abs().max()))
    layer = tiny_lm.model.get_submodule(tiny_sae.hook.module)
    assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_steered_replies_differ_and_unsteered_ones_do_not(tiny_lm, tiny_sae) -> None:
    loads: list[int] = []

    def load():  # type: ignore[no-untyped-def]
        loads.append(1)
        return tiny_sae

    chat = LocalChat(tiny_lm, max_new_tokens=6, sae=load)

    async def main() -> list[str]:
        return list(await asyncio.gather(
            chat.achat(*PAIRS[0], temperature=0.0, seed=0),
            chat.achat(*PAIRS[0], temperature=0.0, seed=0, steer=(3, 4.0)),
        ))

    plain, steered = asyncio.run(main())
    assert plain == chat.chat(*PAIRS[0]), "an unsteered reply is the same beside a steered one"
    assert steered != plain
    assert loads == [1], "the SAE is loaded once, on the first steered request"


def test_per_request_steering_is_checked(tiny_lm, tiny_sae) -> None:
    with pytest.raises(ConfigError, match="needs an SAE"):
        asyncio.run(LocalChat(tiny_lm).achat("s", "u", temperature=0, seed=0, steer=(1, 1.0)))
    chat = LocalChat(tiny_lm, sae=tiny_sae)
    with pytest.raises(ConfigError, match="outside the SAE"):
        asyncio.run(chat.achat("s", "u", temperature=0, seed=0, steer=(tiny_sae.d_sae, 1.0)))


def test_agenerate_steers_each_request_to_its_feature(tiny_lm, tiny_sae) -> None:
    chat = LocalChat(tiny_lm, max_new_tokens=4, sae=tiny_sae)
    seen: list[list[object]] = []
    run = chat._run

    def spy(batch):  # type: ignore[no-untyped-def]
        seen.append([r.steer for r in batch])
        return run(batch)

    chat._run = spy  # type: ignore[method-assign]
    targets = [Target(feature=f, summary=f"theme {f}", spans=["bake bread"]) for f in (2, 9)]
    samples = asyncio.run(agenerate(targets, chat, GenerateSettings(per_feature=2, steer=0.5)))
    assert sorted(map(str, sum(seen, []))) == sorted(map(str, [(2, 0.5)] * 2 + [(9, 0.5)] * 2))
    assert {s.provenance.generator for s in samples} == {"local:tiny+steer0.5"}
