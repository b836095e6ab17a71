"""Toxicity: text + 0/1 label (1 = toxic/harmful/flag) -> a detector, scored by AUPRC.

A thin wrapper over what the loop already runs (tools/data.load_texts, tools/detector,
tools/label_gate.consistent), so a run through the seam gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tools.data import TextDataset, load_texts
from tools.detector import Detector, DetectorSettings, evaluate, fit_detector
from tools.errors import DataError
from tools.label_gate import consistent
from tools.tasks.base import Contrast, Features, check_fields
from tools.verify import Sample


@dataclass(frozen=True)
class ToxicityTask:
    """`detector` picks the downstream model (probe on features, or LoRA on texts, which
    needs `model_folder`: the causal LM to adapt)."""

    name: ClassVar[str] = "toxicity"
    headline: ClassVar[str] = "auprc"
    about: ClassVar[str] = (
        "toxicity detection: rows are texts with a 0/1 label (1 = toxic, harmful or to be "
        "flagged); the downstream model is a detector scored by AUPRC on held-out rows")
    fields: ClassVar[tuple[str, ...]] = ("text", "label")
    # the prompts tools/generate.py and tools/relevance.py use (tests keep them in step)
    generate_prompt: ClassVar[str | None] = "generate_toxicity.v4"
    relevance_prompt: ClassVar[str] = "relevance_toxicity.v2"

    detector: DetectorSettings = field(default_factory=DetectorSettings)
    model_folder: str | None = None
    device: str = "auto"

    def load(self, source: str | Path, *, fields: Mapping[str, str] | None = None,
             require_labels: bool = False) -> TextDataset:
        f = check_fields(self.name, self.fields, fields)
        return load_texts(source, text_field=f["text"], label_field=f["label"],
                          require_labels=require_labels)

    def probe_texts(self, data: TextDataset) -> Contrast:
        return Contrast(list(data.texts), None if data.labels is None else list(data.labels),
                        list(range(len(data))), data.source)

    def split(self, data: TextDataset, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Stratified by label, near-duplicate texts on one side (tools/splits.py)."""
        from tools.splits import stratified_split

        return stratified_split(_labels(data, "split"), frac, seed, texts=data.texts,
                                what=data.source)

    def fit(self, train: TextDataset, features: Features, *, seed: int = 0,
            synthetic: Sequence[bool] | None = None,
            synthetic_share: float | None = None,
            row_scale: Sequence[float] | np.ndarray | None = None) -> Detector:
        """`row_scale` multiplies each row's training weight (e.g. SynAlign's re-weighting
        of synthetic rows)."""
        return fit_detector(
            self.detector, list(train.texts), _labels(train, "train a detector"),
            features=self._features(train, features), model_folder=self.model_folder,
            seed=seed, device=self.device, synthetic=synthetic, synthetic_share=synthetic_share,
            row_scale=row_scale)

    def scores(self, model: Detector, data: TextDataset, features: Features) -> np.ndarray:
        """[n] the detector's probability that each text is toxic."""
        if not len(data):
            return np.zeros(0, dtype=np.float64)
        return np.asarray(model.score(list(data.texts), features=self._features(data, features)))

    def agreement(self, model: Detector, data: TextDataset, features: Features) -> np.ndarray:
        y = np.asarray(_labels(data, "check labels"))
        s = self.scores(model, data, features)
        return np.where(y == 1, s, 1 - s)

    def gate(self, model: Detector, real: TextDataset, synthetic: TextDataset,
             features: Features, quantile: float = 0.25) -> np.ndarray:
        """A synthetic row's score must lie inside the range of real rows of the label it
        claims (tools/label_gate.consistent)."""
        return consistent(self.scores(model, synthetic, features),
                          _labels(synthetic, "gate labels"), self.scores(model, real, features),
                          _labels(real, "gate labels"), quantile)

    def metric(self, model: Detector, data: TextDataset, features: Features) -> dict[str, float]:
        """AUPRC (the headline), AUROC, best F1, rows and positives."""
        m = evaluate(self.scores(model, data, features), _labels(data, "score a detector"))
        return {k: float(v) for k, v in m.model_dump().items()}

    def bind(self, ws: Any) -> ToxicityTask:
        """The task for a workspace: a LoRA detector adapts the workspace's model."""
        if self.detector.kind != "lora" or self.model_folder is not None:
            return self
        from dataclasses import replace

        from tools.models import resolve_model_source

        folder = resolve_model_source(ws.settings.model, ws.settings.home)[0]
        return replace(self, model_folder=folder, device=ws.settings.device)

    def extend(self, data: TextDataset, samples: Sequence[Sample]) -> TextDataset:
        """`data`'s rows, then the samples' (a sample without a label counts as 1)."""
        return TextDataset(list(data.texts) + [s.text for s in samples],
                           _labels(data, "add samples") + [
                               1 if s.label is None else s.label for s in samples],
                           data.source)

    def examples(self, data: TextDataset) -> list[str]:
        """The positive rows: what the baselines are shown (they write label-1 texts)."""
        return [t for t, y in zip(data.texts, _labels(data, "pick examples"), strict=True) if y]

    def pseudo_label(self, model: Detector, data: TextDataset, features: Features,
                     keep: Sequence[int] | np.ndarray) -> TextDataset:
        """`data` labelled by `model`: the `keep` rows keep their labels, the others are 1 for
        the top share of scores equal to the kept rows' positive rate."""
        known = [_labels(data, "pseudo-label")[i] for i in keep]
        return TextDataset(list(data.texts),
                           pseudo_labels(self.scores(model, data, features), keep, known),
                           data.source)

    def _features(self, data: TextDataset, features: Features) -> np.ndarray | None:
        return features(data.texts) if self.detector.needs_features else None


def _labels(data: TextDataset, why: str) -> list[int]:
    if data.labels is None:
        raise DataError(f"{data.source}: has no labels; the toxicity task needs a 0/1 "
                        f"'label' on every row to {why}")
    return data.labels


def pseudo_labels(scores: np.ndarray, seed_rows: Sequence[int] | np.ndarray,
                  seed_labels: Sequence[int]
                  ) -> list[int]:
    """Seed rows keep their labels; the others are 1 for the top share of scores equal to
    the seed's positive rate (the seed detector's view of the pool)."""
    rate = float(np.mean(seed_labels))
    cut = np.quantile(scores, 1 - rate) if 0 < rate < 1 else 0.5
    labels = (scores >= cut).astype(int)
    labels[list(seed_rows)] = list(seed_labels)
    return [int(x) for x in labels]
