"""Heavy resources for one settings object, loaded lazily and once: model, SAE, cache."""

from __future__ import annotations

from functools import cached_property

from agent.config import Settings
from memory.activation_cache import ActivationCache
from memory.feature_memory import ChromaFeatureMemory, minilm_embedder
from tools.coverage import CoverageReport, attach_spans, measure
from tools.data import TextDataset
from tools.errors import ConfigError
from tools.models import PROFILES, LoadedModel, load_model
from tools.probe import ProbeResult, Progress, cache_namespace, probe_texts, top_spans
from tools.sae import LoadedSAE, load_sae


class Workspace:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

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

    def coverage(
        self, anchor: TextDataset, data: TextDataset, progress: Progress | None = None
    ) -> CoverageReport:
        """Probe both sets (cached) and measure the data's FAC against the anchor."""
        s = self.settings
        anchor_acts = self.probe(anchor, progress)
        data_acts = self.probe(data, progress)
        report = measure(anchor_acts, anchor.labels, data_acts, s.activity_rule(), s.judge).report
        spans = top_spans(
            anchor_acts, anchor.texts, self.model.tokenizer, s.probe_settings(),
            [m.feature for m in report.missing], s.top_spans, s.span_window,
        )
        return attach_spans(report, spans)
