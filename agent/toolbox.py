"""The facsynth tools, implemented once: the methods of `Toolbox`.

Each tool is a thin call into the synthesis steps (tools/synthesis.py), the workspace, the
improve loop (agent/runs.py) or the pool path (tools/pool), with bounded, typed parameters
(agent/tool_args.py) and a pydantic result (agent/results.py); its docstring is what the
chat model and MCP clients read. agent/tool_registry.py turns these methods into the chat
agent's and the MCP server's tools. The parts, by concept:

    agent/toolbox_base.py   what they share (root, workspace, LLM, coverage cache, jobs)
    agent/toolbox.py        measuring: describe_dataset, coverage, missing_features,
                            search_features, explain_feature
    agent/toolbox_runs.py   the long tools as jobs (generate_and_verify, improve), report,
                            and job_status / job_result / cancel_job / list_jobs
    agent/toolbox_pool.py   the pool path: select_rows, add_labels

Mistakes in the arguments raise UsageError (PathRefused, DataError where apt). Tools that
measure take an optional progress callback `progress(message, done, total)`; `done` only
grows within one call. The long tools start a job and answer at once (agent/jobs.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import validate_call

from agent.results import (
    CoverageSummary,
    DatasetSummary,
    ExampleRow,
    FeatureExplanation,
    FeatureHit,
    FeatureRelevance,
    FeatureSearch,
    LengthStats,
    MissingFeatures,
    SpanInfo,
)
from agent.tool_args import (
    Anchor,
    Data,
    Examples,
    FeatureId,
    K,
    Limit,
    PathArg,
    ProgressFn,
    Query,
    TaskName,
    Top,
)
from agent.toolbox_base import ToolboxBase, clip
from agent.toolbox_pool import PoolTools
from tools.errors import UsageError

__all__ = ["ProgressFn", "Toolbox"]


class MeasureTools(ToolboxBase):
    """The tools that measure and explain (read-only but for caches)."""

    @validate_call
    def describe_dataset(self, path: PathArg, examples: Examples = 3) -> DatasetSummary:
        """Rows, label balance (1 = harmful), text lengths, duplicates and a few example rows
        of a dataset file (JSONL, CSV or Parquet) in the workspace root."""
        real, d = self._dataset(path, labels=False)
        labels = d.labels
        pos = sum(1 for y in labels or [] if y == 1)
        neg = len(labels) - pos if labels is not None else 0
        seen: set[str] = set()
        dups = 0
        for t in d.texts:
            key = " ".join(t.lower().split())
            dups += key in seen
            seen.add(key)
        n = len(d)
        k = min(examples, n)
        rows = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
        return DatasetSummary(
            path=self.sandbox.rel(real), rows=n, labelled=labels is not None, positives=pos,
            negatives=neg, positive_share=round(pos / n, 4) if labels is not None and n else None,
            chars=LengthStats.of([len(t) for t in d.texts]),
            words=LengthStats.of([len(t.split()) for t in d.texts]), duplicates=dups,
            examples=[ExampleRow(row=i, text=clip(d.texts[i]),
                                 label=labels[i] if labels is not None else None) for i in rows],
        )

    @validate_call
    def coverage(
        self, anchor: Anchor, data: Data, top: Top = 10, task: TaskName = "toxicity",
        progress: ProgressFn | None = None,
    ) -> CoverageSummary:
        """Feature Activation Coverage (FAC) of `data` against the task features of the
        labelled `anchor` set, with the top missing features and a span that activates each.

        The report is cached per anchor/data pair and task until either file changes."""
        report, _, _, cached, cache = self._report(anchor, data, progress, task)
        return CoverageSummary(
            anchor=anchor, data=data, fac=round(report.fac, 4),
            fac_graded=round(report.fac_graded, 4), n_task=report.n_task,
            n_covered=report.n_covered, n_missing=len(report.missing),
            n_deficits=len(report.deficits),
            anchor_fac=round(report.anchor_fac, 4), n_anchor=report.n_anchor,
            n_data=report.n_data, rule=report.rule.describe(report.delta_used),
            saturated=report.saturated, cached=cached, report_path=self.sandbox.rel(cache),
            top_missing=self._missing_info(report, top, spans=1),
        )

    @validate_call
    def missing_features(self, anchor: Anchor, data: Data, limit: Limit = 20,
                         task: TaskName = "toxicity") -> MissingFeatures:
        """The task features `data` never activates (most task-specific first), each with its
        strongest anchor spans and its summary when known."""
        report, *_ = self._report(anchor, data, task=task)
        return MissingFeatures(
            anchor=anchor, data=data, fac=round(report.fac, 4),
            fac_graded=round(report.fac_graded, 4), n_missing=len(report.missing),
            features=self._missing_info(report, limit, spans=3),
        )

    @validate_call
    def search_features(self, query: Query, k: K = 10) -> FeatureSearch:
        """Search the feature memory (the features interpreted so far) by meaning, e.g.
        'weapons' or 'insults'."""
        with self._lock:
            memory = self.workspace.memory
            hits = memory.search(query, k)
            size = len(memory)
        return FeatureSearch(
            query=query, memory_size=size,
            hits=[FeatureHit(feature=r.feature, similarity=round(s, 4), summary=r.summary,
                             interpretable=r.interpretable, relevance=r.relevance)
                  for r, s in hits],
            note=None if size else "the feature memory is empty: explain_feature or "
            "generate_and_verify interpret features and remember them",
        )

    @validate_call
    def explain_feature(self, anchor: Anchor, data: Data, feature: FeatureId
                        ) -> FeatureExplanation:
        """What one SAE feature responds to (a summary), its strongest anchor spans and its
        relevance to the task (support on harmful vs benign rows, missing or not).

        The summary comes from the feature memory, else the LLM writes it from the spans."""
        from tools.coverage import MissingFeature, feature_stats
        from tools.synthesis import FALLBACK, interpret_missing, span_finder

        report, a, d, _, _ = self._report(anchor, data)
        ws = self.workspace
        s = self.settings
        with self._lock:
            if feature >= ws.sae.d_sae:
                raise UsageError(
                    f"feature {feature}: this SAE has features 0..{ws.sae.d_sae - 1}")
            measured = ws.measure(a, d)
            assert a.labels is not None
            pos, neg, lo = feature_stats(measured.anchor_active, a.labels, s.judge.smoothing)
            spans = span_finder(ws, a)([feature], max(s.top_spans, 3))[feature]
            known = ws.memory.get_many([feature]).get(feature)
        missing = next((m for m in report.missing if m.feature == feature), None)
        source: Literal["memory", "interpreted", "top-span"] = "memory"
        record = known
        if record is None:
            if not spans:
                raise UsageError(f"feature {feature} never fires on the anchor set: there is "
                                 "nothing to explain it by")
            one = MissingFeature(feature=feature, pos_support=int(pos[feature]),
                                 neg_support=int(neg[feature]), log_odds=float(lo[feature]),
                                 anchor_max=spans[0].activation, spans=spans)
            with self._lock:
                found = interpret_missing(report.model_copy(update={"missing": [one]}),
                                          self.llm, ws, limit=1, relevance="label")
            record = found.features[0].record
            source = "top-span" if record.prompt_version == FALLBACK else "interpreted"
        return FeatureExplanation(
            feature=feature, summary=record.summary, source=source,
            interpretable=record.interpretable, confidence=record.confidence,
            spans=[SpanInfo(text=clip(x.text, 160), activation=round(x.activation, 3))
                   for x in spans],
            relevance=FeatureRelevance(
                task_feature=bool(measured.task[feature]), missing=missing is not None,
                pos_support=int(pos[feature]), neg_support=int(neg[feature]),
                log_odds=round(float(lo[feature]), 3),
                llm_verdict=record.relevance.get("llm"),
            ),
        )


class Toolbox(MeasureTools, PoolTools):
    """The facsynth tools over one workspace root; see the module doc."""
