"""The synthesis steps, once: every surface (CLI commands, the improve graph, the chat agent,
the MCP server) calls these. Each step reads and returns plain pydantic models, so the CLI
can chain them through JSON files: coverage -> interpret -> generate -> verify.

Between interpret and generate, a round's requests are planned here too: `round_targets`
spreads them over the targeted features in proportion to their coverage deficit and splits
each feature's share into positives and hard negatives; `assign_hosts` picks the real rows
grounded requests rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from memory.feature_memory import FeatureRecord
from tools.coverage import Coverage, CoverageReport, Span
from tools.data import TextDataset
from tools.generate import AsyncChatClient, GenerateSettings, Request, Target, agenerate
from tools.interpret import (
    LOW_SCORE,
    ChatClient,
    LLMOutputError,
    interpret_features,
    score_interpretation,
)
from tools.probe import top_spans
from tools.relevance import PROMPT as RELEVANCE_PROMPT
from tools.relevance import Agreement, Relevance, agreement, judge_feature, keep, verdict_key
from tools.verify import Sample, VerifyReport, verify
from tools.workspace import Workspace

log = logging.getLogger(__name__)

FALLBACK = "fallback-top-span"
"""prompt_version of a feature described by its top span because the LLM gave no summary"""
SpanFn = Callable[[Sequence[int], int], dict[int, list[Span]]]


class Feature(BaseModel):
    """A missing feature after interpretation, ready to generate for."""

    record: FeatureRecord
    log_odds: float = 0.0
    targeted: bool = Field(description="chosen for generation under the relevance setting")
    spans: list[str] = Field(
        default_factory=list,
        description="this anchor's top spans of the feature: generation shows these, never "
        "the spans remembered with the summary (they may come from another anchor)")


class Interpreted(BaseModel):
    relevance: Relevance
    features: list[Feature]
    failed: list[int] = Field(
        default_factory=list, description="no valid LLM summary: described by the top span")
    agreement: Agreement | None = None

    @property
    def targets(self) -> list[Target]:
        return [
            Target(feature=f.record.feature, summary=f.record.summary, spans=f.spans)
            for f in self.features if f.targeted
        ]


def interpret_missing(
    report: CoverageReport,
    client: ChatClient,
    ws: Workspace,
    *,
    limit: int = 10,
    relevance: Relevance = "label",
    score_with: tuple[Sequence[str], SpanFn] | None = None,
    describe: Literal["llm", "spans"] = "llm",
    prompt: str = RELEVANCE_PROMPT,
) -> Interpreted:
    """Summaries (feature memory first, else the LLM) for the top `limit` missing features;
    LLM relevance verdicts unless `relevance == "label"`; detection scores when `score_with`
    = (anchor texts, held-out span finder) is given. Everything learnt goes to memory.
    `describe="spans"` asks the LLM nothing: features without a remembered summary are
    described by their strongest span (a 135M generator fails most summaries after three
    long attempts each, the slowest part of a round on CPU). `prompt` is the task's relevance
    prompt; its verdicts are remembered per task (`verdict_key`)."""
    key = verdict_key(prompt)
    missing = report.missing[:limit]
    spans = {m.feature: m.spans for m in missing}
    if describe == "llm":
        records = interpret_features(spans, client, ws.memory, skip_failures=True)
    else:
        records = {f: r for f, r in ws.memory.get_many(list(spans)).items() if r.interpretable}
    updated: list[FeatureRecord] = []
    for f, rec in records.items():
        changed = False
        if relevance != "label" and key not in rec.relevance:
            try:
                answer = judge_feature(rec.summary, rec.spans, client, prompt)
            except LLMOutputError as e:
                log.warning("feature %d: no relevance verdict (%s)", f, e)
            else:
                rec.relevance[key] = answer.verdict
                rec.relevance[f"{key}_reason"] = answer.reason
                changed = True
        if score_with and "detection" not in rec.scores and rec.interpretable:
            texts, finder = score_with
            held_out = [s.text for s in finder([f], len(rec.spans) + 3)[f][len(rec.spans):]]
            others = _inactive_snippets(ws, texts, f, len(held_out))
            rec.scores["detection"] = score_interpretation(rec.summary, held_out, others, client)
            changed = True
        if rec.scores.get("detection", 1.0) < LOW_SCORE:
            log.info("feature %d: low detection score %.2f", f, rec.scores["detection"])
        if changed:
            updated.append(rec)
    ws.memory.put_many(updated)
    failed = [m.feature for m in missing if m.feature not in records]
    for m in missing:
        if m.feature not in records and m.spans:
            # The LLM gave no valid summary (small models often don't): describe the feature
            # by its strongest span instead, so generation can still aim at it. Not stored
            # in memory, so a better LLM interprets it later.
            records[m.feature] = FeatureRecord(
                feature=m.feature, summary=f'text like "{m.spans[0].text.strip()}"',
                spans=[s.text for s in m.spans], prompt_version=FALLBACK,
            )
    features = [
        Feature(
            record=records[m.feature], log_odds=m.log_odds, spans=[x.text for x in m.spans],
            targeted=records[m.feature].interpretable
            and keep(records[m.feature].relevance.get(key), relevance),
        )
        for m in missing if m.feature in records
    ]
    verdicts = [f.record.relevance[key] for f in features if key in f.record.relevance]
    return Interpreted(
        relevance=relevance, features=features,
        failed=failed,
        agreement=agreement(verdicts) if verdicts else None,
    )


def _inactive_snippets(ws: Workspace, texts: Sequence[str], feature: int, n: int) -> list[str]:
    """Up to n anchor texts (first 80 characters) where `feature` never fires."""
    acts = ws.probe(TextDataset(texts=list(texts), labels=None, source="anchor"))
    fires = np.asarray(acts.max_matrix().tocsc()[:, feature].todense()).ravel() > 0
    rows = np.flatnonzero(~fires)
    rng = np.random.default_rng(feature)
    return [texts[i][:80] for i in rng.permutation(rows)[:n]]


def span_finder(ws: Workspace, anchor: TextDataset) -> SpanFn:
    """Top anchor spans of any features (for held-out interpretation scoring)."""
    acts = ws.probe(anchor)

    def find(features: Sequence[int], n: int) -> dict[int, list[Span]]:
        got = top_spans(acts, anchor.texts, ws.model.tokenizer, ws.settings.probe_settings(),
                        list(features), n, ws.settings.span_window)
        return {f: [Span(row=r, text=t, activation=a) for r, t, a in v] for f, v in got.items()}

    return find


def allocate(weights: Sequence[float], total: int, cap: int) -> list[int]:
    """`total` requests over features in proportion to `weights` (in the caller's priority
    order), at least 1 each and at most `cap` each. When `total` is below the number of
    features, the first `total` get one each; units a capped feature cannot take go to the
    others, so less than `total` is given only when every feature is at `cap`. Highest
    averages (D'Hondt) from a floor of 1: the next unit goes to the largest
    weight / (count + 1), ties to the earlier feature."""
    n = len(weights)
    if n == 0 or total <= 0:
        return [0] * n
    if total <= n:
        return [1] * total + [0] * (n - total)
    counts = [1] * n
    for _ in range(min(total, cap * n) - n):
        open_ = [i for i in range(n) if counts[i] < cap]
        best = max(open_, key=lambda i: (weights[i] / (counts[i] + 1), -i))
        counts[best] += 1
    return counts


def split_labels(counts: Sequence[int], negatives: float) -> list[tuple[int, int]]:
    """(positives, negatives) per feature: `negatives` of all requests as label 0, rounded
    on the running total so the round's share is exact while each feature's is as even as
    its count allows (a lone request goes to the label the running share is short of)."""
    out: list[tuple[int, int]] = []
    seen = given = 0
    for c in counts:
        seen += c
        neg = int(negatives * seen + 1e-9) - given
        given += neg
        out.append((c - neg, neg))
    return out


def round_targets(
    found: Interpreted, deficits: Mapping[int, int], total: int, *, cap: int,
    negatives: float,
) -> list[Target]:
    """A round's targets: `total` requests spread over the targeted features in proportion
    to their deficit (`allocate`; a feature without a deficit counts as the mean of those
    with one, all as 1 when none has one), each feature's share split by `negatives` into a
    label-1 target and a label-0 one (hard negatives on the same theme), each with its `n`."""
    targets = found.targets
    known = [deficits[t.feature] for t in targets if deficits.get(t.feature, 0) > 0]
    fallback = sum(known) / len(known) if known else 1.0
    weights = [float(deficits.get(t.feature, 0)) or fallback for t in targets]
    counts = allocate(weights, total, cap)
    out: list[Target] = []
    for t, (pos, neg) in zip(targets, split_labels(counts, negatives), strict=True):
        if pos:
            out.append(t.model_copy(update={"label": 1, "n": pos}))
        if neg:
            out.append(t.model_copy(update={"label": 0, "n": neg}))
    return out


HOST_MAX_CHARS = 600
"""Longest row used as a host: a rewrite keeps the host's length, and replies are capped at
max_new_tokens (callers pass the smaller of this and ~4 characters per reply token)."""


def assign_hosts(
    requests: Sequence[Request], texts: Sequence[str], labels: Sequence[int] | None,
    seed: int, max_chars: int = HOST_MAX_CHARS,
) -> dict[int, str]:
    """Request seed -> a real row of the request's label (non-empty, at most `max_chars`
    characters) for it to rewrite. A (feature, label)'s requests walk one shuffle of that
    label's rows, so they get different hosts (while rows last) and each feature its own;
    the shuffle depends only on (seed, feature, label): a resumed round picks the same
    hosts. A label without such rows gets none (those requests are written from scratch)."""
    if labels is None:
        log.warning("the anchor has no labels: generation is not grounded in real rows")
        return {}
    pools: dict[int, list[str]] = {}
    for text, y in zip(texts, labels, strict=True):
        if text.strip() and len(text) <= max_chars:
            pools.setdefault(y, []).append(text)
    out: dict[int, str] = {}
    orders: dict[tuple[int, int], list[int]] = {}
    for r in requests:
        pool = pools.get(r.target.label, [])
        if not pool:
            continue
        key = (r.target.feature, r.target.label)
        if key not in orders:
            orders[key] = random.Random(f"hosts:{seed}:{key[0]}:{key[1]}").sample(
                range(len(pool)), len(pool))
        out[r.seed] = pool[orders[key][r.k % len(pool)]]
    missing = {r.target.label for r in requests} - set(pools)
    if missing:
        log.warning("no anchor row of label(s) %s is short enough (%d characters) to host a "
                    "rewrite: those requests are written from scratch", sorted(missing),
                    max_chars)
    return out


def generate(
    targets: Sequence[Target], client: AsyncChatClient, settings: GenerateSettings
) -> list[Sample]:
    return asyncio.run(agenerate(targets, client, settings))


def verify_samples(
    ws: Workspace,
    anchor: TextDataset,
    data: TextDataset,
    samples: Sequence[Sample],
    *,
    coverage: Coverage | None = None,
) -> VerifyReport:
    """Keep samples whose target feature is active under coverage's own rule and thresholds
    (from the anchor), dropping duplicates of `data` and of each other. The thresholds are
    those of `coverage` when given, else of `ws.measure(anchor, data)` (remembered, so a
    verify after a coverage of the same sets measures nothing again)."""
    measured = coverage if coverage is not None else ws.measure(anchor, data)
    acts = ws.probe(TextDataset(texts=[s.text for s in samples], labels=None, source="samples"))
    return verify(samples, acts, ws.settings.activity_rule(), measured.thresholds,
                  existing=data.texts)
