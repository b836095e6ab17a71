"""Heavy resources for one settings object, loaded lazily and once: model, SAE, activation
cache, feature memory; and coverage, measured once per (anchor, data, settings)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import replace
from functools import cached_property

from memory.activation_cache import ActivationCache
from memory.feature_memory import ChromaFeatureMemory, minilm_embedder
from tools.coverage import Coverage, CoverageReport, attach_spans, measure
from tools.data import TextDataset
from tools.errors import ConfigError
from tools.models import PROFILES, LoadedModel, load_model
from tools.probe import ProbeResult, Progress, cache_namespace, probe_texts, top_spans
from tools.sae import LoadedSAE, load_sae
from tools.settings import Settings

MEASURED_KEPT = 8
"""Coverage results a workspace remembers (least recently used dropped first): enough for
one improve run (the current round's data, anchor vs anchor) and a chat session."""


class Workspace:
    """What every synthesis step works against: one per settings object, created cheaply
    and passed in; the model, SAE and stores load on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._measured: OrderedDict[str, Coverage] = OrderedDict()
        self._measured_lock = threading.Lock()

    @cached_property
    def model(self) -> LoadedModel:
        s = self.settings
        return load_model(s.model, cache_dir=s.home, device=s.device, dtype=s.dtype)

    @cached_property
    def sae(self) -> LoadedSAE:
        spec = self.settings.sae
        if spec is None:
            profile = PROFILES.get(self.settings.model)
            if profile is None or profile.default_sae is None:
                raise ConfigError(
                    f"model {self.settings.model!r} has no default SAE: pass --sae "
                    "(a sae-lens folder or release/sae_id)"
                )
            spec = profile.default_sae
        return load_sae(spec, device=self.model.device)

    @cached_property
    def cache(self) -> ActivationCache:
        ns = cache_namespace(self.model, self.sae, self.settings.probe_settings())
        return ActivationCache(self.settings.home / "activations" / f"{ns}.sqlite")

    @cached_property
    def memory(self) -> ChromaFeatureMemory:
        """Feature summaries for this (model, SAE), persistent under `home/memory`."""
        ns = f"{self.model.identity}|{self.sae.identity}|{self.sae.hook}"
        return ChromaFeatureMemory(self.settings.home / "memory", ns, minilm_embedder())

    def probe(self, data: TextDataset, progress: Progress | None = None) -> ProbeResult:
        return probe_texts(
            data.texts, self.model, self.sae, self.settings.probe_settings(),
            cache=self.cache, progress=progress,
        )

    def measure(
        self, anchor: TextDataset, data: TextDataset, progress: Progress | None = None
    ) -> Coverage:
        """The data's FAC against the anchor, with the task mask, thresholds and anchor
        activity, and the top anchor spans of each missing and deficit feature. Computed once per
        (anchor texts and labels, data texts, settings) and remembered: the result is
        shared, so copy the report before changing it. `progress` only sees a probe that
        actually runs."""
        key = self._key(anchor, data)
        with self._measured_lock:
            if key in self._measured:
                self._measured.move_to_end(key)
                return self._measured[key]
        s = self.settings
        anchor_acts = self.probe(anchor, progress)
        data_acts = self.probe(data, progress)
        # a pair task's contrast: its sides are compared within pairs
        judge = s.judge.for_pairs() if anchor.paired else s.judge
        result = measure(anchor_acts, anchor.labels, data_acts, s.activity_rule(), judge,
                         s.graded)
        report = result.report
        # one pass over the anchor for both lists; a missing feature is also a deficit one
        wanted = dict.fromkeys(m.feature for m in [*report.missing, *report.deficits])
        spans = top_spans(
            anchor_acts, anchor.texts, self.model.tokenizer, s.probe_settings(),
            list(wanted), s.top_spans, s.span_window,
        )
        result = replace(result, report=attach_spans(result.report, spans))
        with self._measured_lock:
            self._measured[key] = result
            while len(self._measured) > MEASURED_KEPT:
                self._measured.popitem(last=False)
        return result

    def coverage(
        self, anchor: TextDataset, data: TextDataset, progress: Progress | None = None
    ) -> CoverageReport:
        """Probe both sets (cached) and measure the data's FAC against the anchor: the
        report of `measure`, as a copy the caller may change."""
        return self.measure(anchor, data, progress).report.model_copy(deep=True)

    def _key(self, anchor: TextDataset, data: TextDataset) -> str:
        """Content hash of what a coverage result depends on (sources are just names)."""
        content = json.dumps([self.settings.model_dump_json(), anchor.texts, anchor.labels,
                              data.texts] + (["paired"] if anchor.paired else []))
        return hashlib.sha256(content.encode("utf-8")).hexdigest()
