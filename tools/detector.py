"""Downstream detectors and their metrics: two kinds behind one interface.

`probe` (the fast default): a standardised, class-balanced logistic regression on frozen
features of the model, namely the mean layer residual the probe already stores per text
(`ProbeResult.pooled()`). Callers pass those feature matrices; texts are not used.

`lora` (the paper's detector): LoRA sequence classification on the causal LM itself
(peft, rank 8 on q_proj/v_proj, the classification head trained in full), class-balanced
cross-entropy, AdamW with linear decay (tools/lora_detector.py). It reads texts; features
are not used.

    det = fit_detector(settings, train_texts, train_y, features=x_train,
                       model_folder=folder, seed=seed, out_dir=run / "detector")
    metrics = evaluate(det.score(test_texts, features=x_test), test_y)
    det = load_detector(run / "detector")

Synthetic rows: both kinds are class-balanced (each label weighs the same in total). With a
`synthetic` mask and a `synthetic_share` s, the synthetic rows of each label share s of that
label's weight and its real rows 1 - s (`row_weights`); without a share every row of a label
weighs the same, synthetic or not.

Heavy libraries (sklearn, torch, transformers, peft) are imported lazily so settings
objects can import `DetectorSettings` cheaply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as progress(done, total) with optimizer steps done of all steps."""

MANIFEST = "detector.json"
PROBE_FILE = "probe.joblib"


class Metrics(BaseModel):
    auprc: float
    auroc: float
    best_f1: float
    n: int
    n_positive: int


class DetectorSettings(BaseModel):
    """Which detector and its hyper-parameters (`c` for probe; the rest for lora)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["probe", "lora"] = "probe"
    c: float = Field(0.1, gt=0, description="probe: inverse L2 strength of the regression")
    lora_r: int = Field(8, ge=1, description="lora: adapter rank")
    lora_alpha: int = Field(16, ge=1, description="lora: adapter scale numerator")
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = Field(5e-5, gt=0, description="lora: peak learning rate (linear decay)")
    epochs: int = Field(3, ge=1)
    max_length: int = Field(512, ge=2, description="lora: tokens per text (truncated)")
    batch_size: int = Field(8, ge=1, description="lora: texts per step (and per scoring batch)")

    @property
    def needs_features(self) -> bool:
        """True when fit/score need the precomputed feature matrix (probe kind)."""
        return self.kind == "probe"


@runtime_checkable
class Detector(Protocol):
    """A fitted detector. `score` returns positive-class probabilities, one per row."""

    kind: str
    settings: DetectorSettings

    def score(
        self, texts: Sequence[str] | None = None, *, features: np.ndarray | None = None
    ) -> np.ndarray: ...

    def save(self, out_dir: Path) -> Path: ...


# --- metrics -----------------------------------------------------------------------------


def evaluate(scores: np.ndarray, y: Sequence[int] | np.ndarray) -> Metrics:
    """AUPRC (average precision), AUROC and best F1 of scores against 0/1 labels."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    labels = np.asarray(y)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall + 1e-12), 0)
    return Metrics(
        auprc=float(average_precision_score(labels, scores)),
        auroc=float(roc_auc_score(labels, scores)),
        best_f1=float(f1.max()),
        n=len(labels),
        n_positive=int(labels.sum()),
    )


def summarize(metrics: Sequence[Metrics]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) over seeds."""
    if not metrics:
        raise ValueError("summarize needs at least one Metrics")
    out: dict[str, float] = {"n_seeds": float(len(metrics))}
    for name in ("auprc", "auroc", "best_f1"):
        values = np.array([getattr(m, name) for m in metrics], dtype=np.float64)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def check_labels(y: Sequence[int] | np.ndarray, n: int | None = None) -> np.ndarray:
    labels = np.asarray(y)
    if n is not None and len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} training rows")
    values = set(labels.tolist())
    if not values <= {0, 1}:
        raise DataError(f"detector labels must be 0 or 1, got {sorted(values)[:5]}")
    if len(values) < 2:
        raise DataError("a detector needs both positive (1) and negative (0) training rows")
    return labels.astype(np.int64)


def row_weights(
    labels: Sequence[int] | np.ndarray,
    synthetic: Sequence[bool] | np.ndarray | None = None,
    share: float | None = None,
) -> np.ndarray:
    """[n] training weight of each row. Without a share: sklearn's "balanced",
    n / (2 * n_label) per row (each label's rows sum to n / 2).

    With a share s in [0, 1): the weights sum to the number of real rows and each label's
    rows to half of that; within a label, its synthetic rows together get s of the label's
    weight and its real rows 1 - s (a label without synthetic rows, or without real ones,
    gives all of it to the rows it has). So synthetic rows never add weight or weaken the
    regularisation, and s = 0 is training on the real rows alone."""
    y = np.asarray(labels)
    n = len(y)
    counts = np.bincount(y, minlength=2)
    if share is None:
        return np.asarray(n / (2.0 * counts[y]), dtype=np.float64)
    if not 0 <= share < 1:
        raise ConfigError(f"synthetic_share must be in [0, 1), got {share}")
    fake = np.zeros(n, dtype=bool) if synthetic is None else np.asarray(synthetic, dtype=bool)
    if len(fake) != n:
        raise DataError(f"{len(fake)} synthetic flags for {n} training rows")
    total = float((~fake).sum()) or float(n)  # all synthetic: nothing to borrow from
    out = np.zeros(n, dtype=np.float64)
    for label in (0, 1):
        mine = y == label
        if not mine.any():
            continue
        real, synth = mine & ~fake, mine & fake
        parts = [(real, 1 - share), (synth, share)] if real.any() and synth.any() else [(mine, 1)]
        for rows, part in parts:
            out[rows] = total / 2 * part / rows.sum()
    return out


# --- probe: logistic regression on frozen features -------------------------------------


def train_probe_detector(
    x: np.ndarray, y: Sequence[int] | np.ndarray, *, c: float = 0.1, seed: int = 0,
    sample_weight: np.ndarray | None = None,
) -> Pipeline:
    """Fit standardise + balanced logistic regression on [n, d] features; `sample_weight`
    ([n], e.g. `row_weights`) replaces the class balancing. The scaler still weighs rows
    equally but leaves out rows of weight 0, so such a row changes nothing."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = check_labels(y, len(x))
    if sample_weight is None:
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed),
        )
        model.fit(x, labels)
        return model
    w = np.asarray(sample_weight, dtype=np.float64)
    if len(w) != len(labels):
        raise DataError(f"{len(w)} row weights for {len(labels)} training rows")
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    model.fit(x, labels, standardscaler__sample_weight=(w > 0).astype(np.float64),
              logisticregression__sample_weight=w)
    return model


def score(model: Pipeline, x: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_proba(x)[:, 1])


class ProbeDetector:
    kind = "probe"

    def __init__(self, pipeline: Pipeline, settings: DetectorSettings,
                 extra: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.extra = extra or {}

    def score(
        self, texts: Sequence[str] | None = None, *, features: np.ndarray | None = None
    ) -> np.ndarray:
        if features is None:
            raise ConfigError("the probe detector scores feature rows: pass features=")
        if texts is not None and len(texts) != len(features):
            raise DataError(f"{len(texts)} texts but {len(features)} feature rows")
        if len(features) == 0:
            return np.zeros(0, dtype=np.float64)
        return score(self.pipeline, np.asarray(features))

    def save(self, out_dir: Path) -> Path:
        import joblib

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.pipeline, out_dir / PROBE_FILE)
        write_manifest(out_dir, self.settings, self.extra)
        return out_dir


# --- one interface -------------------------------------------------------------------------


def write_manifest(out_dir: Path, settings: DetectorSettings, extra: dict[str, Any]) -> None:
    manifest = {"version": 1, "settings": settings.model_dump(mode="json"), **extra}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def fit_detector(
    settings: DetectorSettings,
    texts: Sequence[str] | None,
    labels: Sequence[int] | np.ndarray,
    *,
    features: np.ndarray | None = None,
    model_folder: str | Path | None = None,
    seed: int = 0,
    out_dir: Path | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    synthetic: Sequence[bool] | np.ndarray | None = None,
    synthetic_share: float | None = None,
    row_scale: Sequence[float] | np.ndarray | None = None,
) -> Detector:
    """Train the detector `settings.kind` names; save it to out_dir when given.

    probe: needs `features` ([n, d], e.g. `ProbeResult.pooled()`); texts may be None.
    lora: needs `texts` and `model_folder` (a transformers causal-LM folder or hub id).
    `synthetic` ([n] bool) marks synthetic rows; with `synthetic_share` they get that share
    of each label's weight (`row_weights`), without it they weigh like real rows. Both are
    recorded in the manifest. `row_scale` ([n]) multiplies the rows' weights after that.
    """
    det: Detector
    if synthetic is not None and len(synthetic) != len(labels):
        raise DataError(f"{len(synthetic)} synthetic flags for {len(labels)} training rows")
    weights = None
    if synthetic_share is not None or row_scale is not None:
        weights = row_weights(check_labels(labels), synthetic, synthetic_share)
    if row_scale is not None:
        assert weights is not None
        scale = np.asarray(row_scale, dtype=np.float64)
        if len(scale) != len(weights) or not np.all(np.isfinite(scale)) or (scale < 0).any():
            raise DataError(f"row_scale: {len(scale)} finite, non-negative factors are needed "
                            f"for {len(weights)} training rows")
        weights = weights * scale
    n_synthetic = int(np.asarray(synthetic, dtype=bool).sum()) if synthetic is not None else 0
    recorded = {"synthetic_share": synthetic_share, "n_synthetic": n_synthetic}
    if settings.kind == "probe":
        if features is None:
            raise ConfigError("the probe detector trains on feature rows: pass features=")
        if texts is not None and len(texts) != len(features):
            raise DataError(f"{len(texts)} texts but {len(features)} feature rows")
        pipeline = train_probe_detector(np.asarray(features), labels, c=settings.c, seed=seed,
                                        sample_weight=weights)
        det = ProbeDetector(pipeline, settings, recorded)
    else:
        if texts is None:
            raise ConfigError("the lora detector trains on texts: pass texts")
        if model_folder is None:
            raise ConfigError("the lora detector needs model_folder (the causal LM to adapt)")
        from tools.lora_detector import train_lora_detector

        lora = train_lora_detector(
            texts, labels, model_folder=model_folder, settings=settings, seed=seed,
            device=device, progress=progress, sample_weight=weights,
        )
        lora.extra.update(recorded)
        det = lora
    if out_dir is not None:
        det.save(out_dir)
    return det


def load_detector(
    folder: Path, *, model_folder: str | Path | None = None, device: str = "auto"
) -> Detector:
    """A detector saved by `save`; `model_folder` overrides the lora base model's path."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise DataError(f"{path} is missing: not a saved detector")
    manifest = json.loads(path.read_text())
    settings = DetectorSettings.model_validate(manifest["settings"])
    if settings.kind == "probe":
        import joblib

        return ProbeDetector(joblib.load(folder / PROBE_FILE), settings)
    base = str(model_folder) if model_folder is not None else manifest.get("model_folder")
    if base is None:
        raise DataError(f"{path} names no model_folder: pass model_folder=")
    from tools.lora_detector import load_lora_detector

    return load_lora_detector(folder, settings, base, device)
