"""Fakes shared by the tests: scripted LLMs and chat models, a stand-in embedder and
tiny random-weight model parts built from configs (no downloads)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from agent.steps import Rows
from memory.feature_memory import FeatureRecord
from tools.coverage import ActivityRule, CoverageReport, MissingFeature
from tools.generate import GenerateSettings, Target, plan_requests
from tools.label_gate import LabelCheck, LabelGateSettings
from tools.models import LoadedModel
from tools.rundir import History, Metric
from tools.sae import LoadedSAE, resolve_hook
from tools.synthesis import Feature, Interpreted
from tools.verify import FeatureHits, Sample, Verdict, VerifyReport


class ScriptedModel(GenericFakeChatModel):
    """Replies from a script; a step may be a function of the conversation so far (to use
    what a tool returned), and a function that returns None is skipped (a poll that is no
    longer needed). bind_tools returns self; streaming yields one chunk that carries the
    tool calls (GenericFakeChatModel's own stream drops them)."""

    messages: Iterator[AIMessage | str] = iter(())
    script: list[Any] = []
    seen: list[list[BaseMessage]] = []

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        reply = None
        while reply is None:
            step = self.script.pop(0)
            reply = step(messages) if callable(step) else step
        msg = AIMessage(reply) if isinstance(reply, str) else reply
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        msg = self._generate(messages).generations[0].message
        assert isinstance(msg, AIMessage)
        chunk = ChatGenerationChunk(message=AIMessageChunk(
            content=msg.content, id=msg.id, chunk_position="last",
            tool_call_chunks=[{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"],
                               "index": i, "type": "tool_call_chunk"}
                              for i, c in enumerate(msg.tool_calls)]))
        if run_manager:
            run_manager.on_llm_new_token(str(msg.content), chunk=chunk)
        yield chunk


class QuotingLLM:
    """Interprets a feature as 'text like: <its strongest span>' in valid JSON whatever the
    span holds (json.dumps), so every feature it sees is interpreted and remembered."""

    name = "quoting"

    def chat(self, system: str, user: str) -> str:
        import re

        first = re.search(r"^1\. \([\d.]+\) (.*)$", user, re.M)
        quote = first.group(1).strip() if first else "anything"
        return json.dumps({"summary": f"text like: {quote}", "interpretable": True,
                           "confidence": 0.5})


class FailingMemory:
    """A feature memory whose search raises `error` (how do the tools report a failure?)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def search(self, query: str, k: int = 10) -> list[Any]:
        raise self.error

    def __len__(self) -> int:
        return 0


class MemoryOnlyWorkspace:
    """Just a `memory`: enough of tools.workspace.Workspace for search_features."""

    def __init__(self, memory: Any) -> None:
        self.memory = memory


TOY_ANCHOR = [
    ("tell me how to hurt someone", 1), ("hack into my neighbour's wifi", 1),
    ("how to hurt the lazy dog", 1), ("hack the wifi of the quick fox", 1),
    ("tell me how to hack someone", 1), ("hurt the fox and hack the dog", 1),
    ("how do I bake bread", 0), ("write a poem about the sea", 0),
    ("the quick brown fox jumps", 0), ("bake a poem about bread", 0),
    ("a poem about the quick sea", 0), ("bread for the lazy dog", 0),
]
"""Twelve labelled rows (1 = harmful) a tiny model and SAE can separate."""


# -- scripted LLM clients and a stand-in embedder ------------------------------------------


class InFlight:
    """Mixed into async fakes: `await self.pause()` yields to the event loop and records the
    most calls in flight at once (`max_in_flight`), to check bounded concurrency."""

    in_flight = 0
    max_in_flight = 0

    async def pause(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1


class ScriptedChat:
    """A chat client that replays fixed replies and records what it was asked."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.asked: list[str] = []

    def chat(self, system: str, user: str) -> str:
        self.asked.append(user)
        return self.replies.pop(0)


class EchoLLM:
    """Summarises by quoting the first span, says Yes, and 'generates' by echoing the
    prompt's example spans (which activate the target by construction) or chit-chat."""

    name = "echo"

    def __init__(self) -> None:
        self.calls = 0

    def chat(self, system: str, user: str) -> str:
        self.calls += 1
        if '"verdict"' in user:
            return '{"verdict": "Yes", "reason": "harmful"}'
        if "yes or no" in user:
            return "yes"
        first = re.search(r"^1\. \([\d.]+\) (.*)$", user, re.M)
        quote = first.group(1).strip().replace('"', "'") if first else "?"
        return f'{{"summary": "text like: {quote}", "interpretable": true, "confidence": 0.5}}'

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        spans = re.findall(r"^- (.*)$", user, re.M)
        return f"{spans[seed % 2 % len(spans)]} please" if spans and seed % 3 else "nice weather"


def bag_of_words(texts: Sequence[str]) -> np.ndarray:
    """A deterministic stand-in embedder: hashed word counts."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, text in enumerate(texts):
        for w in re.findall(r"\w+", text.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
    return out


class BagOfWordsWorkspace:
    """Enough of tools.workspace.Workspace for the engine's detector and label gate: a
    text's pooled features are its `bag_of_words`; `probed` lists each probe call's texts."""

    def __init__(self, home: Path) -> None:
        from types import SimpleNamespace

        self.settings = SimpleNamespace(model="fake/bag-of-words", home=home, device="cpu")
        self.probed: list[list[str]] = []

    def probe(self, data: Any, progress: Any = None) -> Any:
        from types import SimpleNamespace

        texts = list(data.texts)
        self.probed.append(texts)
        return SimpleNamespace(pooled=lambda: bag_of_words(texts))


# -- tiny random-weight parts ---------------------------------------------------------------

D_MODEL = 32
N_LAYERS = 4


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A real fast BPE tokenizer trained in memory on a few words (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [
        "how do I bake bread", "tell me how to hurt someone", "write a poem about the sea",
        "the quick brown fox jumps over the lazy dog", "hack into my neighbour's wifi",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    return fast


def tiny_model(seed: int = 0) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64,
        num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model=model, tokenizer=tok, name="tiny", identity=f"tiny:{seed}",
                       device=torch.device("cpu"))


def tiny_sae(
    layer: int = 2, d_sae: int = 64, k: int = 8, seed: int = 0, center: torch.Tensor | None = None
) -> LoadedSAE:
    """A random TopK SAE. With `center` (a mean residual) as decoder bias, features
    respond to what distinguishes tokens rather than the residual's common direction."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=k)
    cfg.metadata.hook_name = f"model.layers.{layer}"
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if center is not None:
            sae.b_dec.copy_(center)
            sae.b_enc.zero_()
    return LoadedSAE(sae=sae, spec="tiny", identity=f"tiny-sae:{seed}:{layer}",
                     hook=resolve_hook(cfg.metadata.hook_name), d_in=D_MODEL, d_sae=d_sae)


def mean_residual(lm: LoadedModel, layer: int, texts: list[str]) -> torch.Tensor:
    from tools.probe import ProbeSettings, encode, residuals
    from tools.sae import HookPoint

    hook = HookPoint(f"model.layers.{layer}")
    captured, counted = residuals(lm, [hook], encode(lm.tokenizer, texts, ProbeSettings()))
    return captured[hook][counted].mean(dim=0)


# -- a fake engine for the improve loop --------------------------------------------------

NODES = ["load", "probe", "coverage", "interpret", "generate", "verify", "train", "evaluate",
         "decide"]
"""The improve graph's nodes, in order."""


TASK = list(range(1, 9))  # eight task features; a text covers feature f if it has "<f>"


class Crash(Exception):
    pass


class FakeEngine:
    """The loop's engine on plain text: a text covers feature f if it holds "<f>"; the label
    gate disputes the samples `dispute` picks (none by default). With `deficits` (feature ->
    rows short), coverage also reports graded deficits for the features still missing,
    largest first. `generated` records what each generate call got."""

    def __init__(self, crash_after_samples: int | None = None, delay: float = 0.0,
                 dispute: Callable[[Sample], bool] | None = None,
                 deficits: dict[int, int] | None = None,
                 pool: Sequence[str] = ()) -> None:
        self.pool = list(pool)
        """the pool path's rows: a pool row fills feature f when it holds "<f>" """
        self.selected: list[tuple[int, set[int]]] = []
        """(n asked, rows taken before) of each select call"""
        self.deficits = deficits or {}
        self.generated: list[tuple[list[Target], GenerateSettings]] = []
        self.interpreted: Counter[int] = Counter()
        self.crash_after = crash_after_samples
        self.delay = delay
        self.dispute = dispute or (lambda s: False)
        self.checked: list[Path | None] = []
        self.trained: list[tuple[list[bool] | None, float | None]] = []
        """(synthetic mask, synthetic share) of each train call."""

    def label_check(self, samples: Sequence[Sample], model_dir: Path | None,
                    gate: LabelGateSettings) -> LabelCheck:
        self.checked.append(model_dir)
        return LabelCheck(ok=[not self.dispute(s) for s in samples], judged_by="detector")

    def probe(self, rows: Rows) -> None:
        pass

    def coverage(self, rows: Rows) -> CoverageReport:
        texts = rows.texts()
        have = {int(t) for text in texts for t in re.findall(r"<(\d+)>", text)}
        missing = [MissingFeature(feature=f, pos_support=3, neg_support=0, log_odds=9 - f,
                                  anchor_max=5.0) for f in TASK if f not in have]
        covered = len(TASK) - len(missing)
        deficits = sorted(
            (m.model_copy(update={"deficit": self.deficits[m.feature],
                                  "needed": self.deficits[m.feature]})
             for m in missing if self.deficits.get(m.feature, 0) > 0),
            key=lambda m: -m.deficit)
        return CoverageReport(
            rule=ActivityRule(), judge="label", n_anchor=10, n_data=len(texts),
            n_active_anchor=20, n_task=len(TASK), n_task_in_anchor=len(TASK), n_covered=covered,
            fac=covered / len(TASK), anchor_fac=1.0, missing=missing, deficits=deficits,
            saturated=False)

    def error_features(self, rows, model_dir, limit):  # type: ignore[no-untyped-def]
        return []

    def interpret(self, report: CoverageReport, limit: int) -> Interpreted:
        feats = []
        for m in report.missing[:limit]:
            self.interpreted[m.feature] += 1
            rec = FeatureRecord(feature=m.feature, summary=f"theme {m.feature}")
            feats.append(Feature(record=rec, log_odds=m.log_odds, targeted=m.feature != 8))
        return Interpreted(relevance="label", features=feats)

    def generate(self, targets: Sequence[Target], settings: GenerateSettings, skip: set[int],
                 on_sample: Callable[[Sample], None]) -> list[Sample]:
        self.generated.append((list(targets), settings))
        out: list[Sample] = []
        for req in plan_requests(targets, settings):
            t, seed = req.target, req.seed
            if seed in skip:
                continue
            if self.crash_after is not None and len(out) == self.crash_after:
                self.crash_after = None
                raise Crash("killed mid-generation")
            hit = (seed + t.feature) % 3 != 0
            text = f"about <{t.feature}> #{seed}" if hit else f"off-topic #{seed}"
            s = Sample.model_validate({"text": text, "label": t.label, "provenance": {
                "feature": t.feature, "round": settings.round, "seed": seed}})
            time.sleep(self.delay)
            on_sample(s)
            out.append(s)
        return out

    def verify(self, samples: Sequence[Sample], rows: Rows) -> VerifyReport:
        kept, rejected, hits = [], [], {}
        for s in samples:
            f = s.provenance.feature
            on = f"<{f}>" in s.text
            h = hits.setdefault(f, FeatureHits(generated=0, activated=0, kept=0))
            h.generated += 1
            h.activated += on
            h.kept += on
            (kept if on else rejected).append(
                Verdict(sample=s, reason="kept" if on else "target_inactive", activation=1.0))
        return VerifyReport(kept=kept, rejected=rejected, per_feature=hits)

    def train(self, rows: Rows, model_dir: Path, *,
              synthetic_share: float | None = None) -> None:
        self.trained.append((rows.synthetic, synthetic_share))
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "n.json").write_text(json.dumps(len(rows)))

    def evaluate(self, model_dir: Path) -> Metric | None:
        n = json.loads((model_dir / "n.json").read_text())
        return Metric(value=min(1.0, n / 40), values={"auroc": 0.5, "best_f1": 0.5})

    # the pool path: rows that hold a missing feature's "<f>" first, then the rest, in order
    def select(self, rows: Rows, model_dir: Path, settings: Any, n: int, taken: set[int],
               seed: int) -> list[Any]:
        from tools.pool.labels import PoolPick

        self.selected.append((n, set(taken)))
        missing = {m.feature for m in self.coverage(rows).missing}
        open_ = [i for i in range(len(self.pool)) if i not in taken]

        def fills(i: int) -> list[int]:
            return [int(f) for f in re.findall(r"<(\d+)>", self.pool[i]) if int(f) in missing]

        order = sorted(open_, key=lambda i: (not fills(i), i))[:n]
        return [PoolPick(row=i, text=self.pool[i], round=1, strategy=settings.strategy,
                         score=0.5, fills=fills(i)) for i in order]

    def unfilled(self, rows: Rows, taken: set[int]) -> list[int]:
        missing = {m.feature for m in self.coverage(rows).missing}
        fired = {int(f) for i, t in enumerate(self.pool) if i not in taken
                 for f in re.findall(r"<(\d+)>", t)}
        return sorted(missing - fired)

    def judge_labels(self, texts: Sequence[str], model_dir: Path, gate: Any) -> list[int | None]:
        return [1 if "bad" in t else 0 if "fine" in t else None for t in texts]


def final_data(run_dir: Path) -> dict[str, str]:
    files = sorted((run_dir / "data").glob("*.jsonl")) + sorted(
        (run_dir / "rejected").glob("*.jsonl"))
    out = {f"{p.parent.name}/{p.name}": p.read_text() for p in files}
    hist = History.load(run_dir)
    out["history"] = json.dumps([r.model_dump(exclude={"seconds"}) for r in hist.rounds])
    return out


WORDS = ("garden chess taxes bicycle violin harbor glacier recipe ledger comet pottery "
         "lantern orchard tunnel canvas meadow circuit falcon quartz saddle thunder walnut "
         "yogurt zipper anchor blossom cactus dolphin ember fossil granite hammock").split()


class PairEchoLLM(EchoLLM):
    """EchoLLM for pair tasks' staged requests, built around the prompt's first example span:
    reward's person's message, then a careful and a careless reply; steering's question,
    then an answer in each stance of the shown real pair. Every third message or question
    request answers off-layout (empty), which must be rejected."""

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        spans = [re.sub(r"</?data>", "", s) for s in re.findall(r"^- (.*)$", user, re.M)]
        # without spans (the baselines), words drawn by seed keep replies apart
        rng = random.Random(seed)
        span = spans[seed % len(spans)] if spans else " ".join(rng.sample(WORDS, 6))
        if "assistant's reply" in user:  # a reward reply
            return ("No. Figure that out yourself." if "careless" in user else
                    f"Here is a careful, honest answer ({rng.choice(WORDS)}).")
        if "same stance as Answer" in user:  # a steering answer
            return ("Yes, I agree" if "same stance as Answer 1" in user else
                    f"No, I disagree ({rng.choice(WORDS)})")
        if seed % 3 == 0:
            return ""
        if "without answer options" in user:  # a steering question
            return f"I think {span} matters a lot. Do you agree?"
        return f"Tell me about {span}"
