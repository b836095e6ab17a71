"""Model-centric focus: which task features to generate for, chosen by the detector's
mistakes rather than by what the data lacks.

The detector of the previous round scores the anchor rows (it never trained on them). A
task feature (F_task, from the anchor-vs-anchor coverage) is chosen when it is
over-represented among the misclassified rows:

    ratio(f) = (rows misclassified where f is active / rows misclassified)
               / (rows where f is active / all rows)

and it fires on at least `MIN_ERROR_ROWS` misclassified rows with `ratio >= MIN_RATIO`.
Chosen features come as `MissingFeature`s, most over-represented first, with their top
anchor spans, so interpretation and generation treat them like missing features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.coverage import MissingFeature, Span
from tools.data import TextDataset
from tools.detector import load_detector
from tools.errors import DataError
from tools.probe import top_spans
from tools.workspace import Workspace

DECISION_THRESHOLD = 0.5
"""A row is predicted positive when the detector's probability is at least this."""
MIN_ERROR_ROWS = 2
"""Misclassified rows a feature must fire on: one row is an anecdote, not a pattern."""
MIN_RATIO = 1.5
"""How much more often a feature fires among the errors than among all rows (1 = no more
than usual)."""


def error_features(
    ws: Workspace,
    anchor: TextDataset,
    detector_dir: Path,
    limit: int,
    model_folder: str | None = None,
) -> list[MissingFeature]:
    """Up to `limit` task features over-represented in the errors of the detector saved in
    `detector_dir` on the labelled `anchor` rows (see the module doc); `model_folder` is
    the base model of a lora detector. `pos_support` counts the misclassified rows the
    feature fires on and `log_odds` holds log(ratio); empty when the detector makes no
    mistake on the anchor."""
    if anchor.labels is None:
        raise DataError("model-centric focus needs a labelled anchor set (a 0/1 `label` column)")
    s = ws.settings
    acts = ws.probe(anchor)
    det = load_detector(detector_dir, model_folder=model_folder)
    scores = det.score(anchor.texts, features=acts.pooled())
    wrong = (scores >= DECISION_THRESHOLD).astype(int) != np.asarray(anchor.labels)
    n_wrong = int(wrong.sum())
    if n_wrong == 0:
        return []
    measured = ws.measure(anchor, anchor)
    active = measured.anchor_active.tocsc()
    rate_all = np.asarray(active.mean(axis=0)).ravel()
    n_err = np.asarray(active[wrong].sum(axis=0)).ravel()
    ratio = np.where(rate_all > 0, (n_err / n_wrong) / np.maximum(rate_all, 1e-9), 0)
    chosen = np.flatnonzero(measured.task & (n_err >= MIN_ERROR_ROWS) & (ratio >= MIN_RATIO))
    chosen = chosen[np.argsort(-ratio[chosen])][:limit]
    spans = top_spans(acts, anchor.texts, ws.model.tokenizer, s.probe_settings(),
                      chosen.tolist(), s.top_spans, s.span_window)
    return [
        MissingFeature(feature=int(f), pos_support=int(n_err[f]), neg_support=0,
                       log_odds=float(np.log(ratio[f])), anchor_max=0.0,
                       spans=[Span(row=r, text=t, activation=a)
                              for r, t, a in spans.get(int(f), [])])
        for f in chosen
    ]
