"""Downstream detectors and their metrics: two kinds behind one interface.

`probe` (the fast default): a standardised, class-balanced logistic regression on frozen
features of the model, namely the mean layer residual the probe already stores per text
(`ProbeResult.pooled()`). Callers pass those feature matrices; texts are not used.

`lora` (the paper's detector): LoRA sequence classification on the causal LM itself
(peft, rank 8 on q_proj/v_proj, the classification head trained in full), class-balanced
cross-entropy, AdamW with linear decay. It reads texts; features are not used.

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
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
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


def _check_labels(y: Sequence[int] | np.ndarray, n: int | None = None) -> np.ndarray:
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

    labels = _check_labels(y, len(x))
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
        _write_manifest(out_dir, self.settings, self.extra)
        return out_dir


# --- lora: LoRA sequence classification on the causal LM -------------------------------


def autocast_for(device: torch.device) -> Any:
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _load_base(model_folder: str, device: torch.device, seed: int) -> tuple[Any, Any]:
    """(sequence classifier with a fresh 2-way head, tokenizer) from a causal-LM folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from tools.errors import ModelError

    verbosity = hf_logging.get_verbosity()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        torch.manual_seed(seed)  # the head's initialisation
        # bf16 weights on GPUs (trained under autocast, trainable params in fp32)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # the head ("score") is new by design: silence the load report's MISSING table
        # (real load errors still raise)
        hf_logging.set_verbosity(logging.ERROR)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_folder, num_labels=2, dtype=dtype
        )
    except OSError as e:
        raise ModelError(f"cannot load {model_folder} as a sequence classifier: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    # the head reads the last non-pad token of each row
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return [list(row) if len(row) else [fallback] for row in ids]


def collate_ids(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (less padding): shuffle, sort within chunks of
    50 batches, cut, shuffle the batches (like transformers' group_by_length)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = 50 * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def attach_lora(
    base: Any, config: Any, device: torch.device, seed: int
) -> tuple[Any, list[torch.nn.Parameter]]:
    """(peft model with fresh adapters from `config` over `base`, seeded, on `device`; its
    trainable parameters), those in fp32: optimizer state and updates stay fp32 even over
    bf16 weights."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)  # the adapters' initialisation
    model = get_peft_model(base, config)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return model, params


def adamw_linear_decay(
    params: Sequence[torch.nn.Parameter], lr: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay) at `lr`, decaying linearly towards 0 over `total_steps`."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / total_steps)
    return optimizer, scheduler


class LoraDetector:
    kind = "lora"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: DetectorSettings,
        model_folder: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.model = model  # peft PeftModelForSequenceClassification
        self.tokenizer = tokenizer
        self.settings = settings
        self.model_folder = model_folder
        self.extra = extra or {}

    @property
    def device(self) -> torch.device:
        first: torch.nn.Parameter = next(self.model.parameters())
        return first.device

    def score(
        self, texts: Sequence[str] | None = None, *, features: np.ndarray | None = None
    ) -> np.ndarray:
        """Positive-class probabilities, batched by length, no grad (features ignored)."""
        import torch

        if texts is None:
            raise ConfigError("the lora detector scores texts: pass texts")
        if not len(texts):
            return np.zeros(0, dtype=np.float64)
        ids = _tokenize(self.tokenizer, texts, self.settings.max_length)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros(len(ids), dtype=np.float64)
        device = self.device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), autocast_for(device):
                for start in range(0, len(order), self.settings.batch_size):
                    idx = order[start : start + self.settings.batch_size]
                    x, mask = collate_ids([ids[i] for i in idx], self.tokenizer.pad_token_id)
                    logits = self.model(
                        input_ids=x.to(device), attention_mask=mask.to(device)
                    ).logits
                    prob = torch.softmax(logits.float(), dim=-1)[:, 1]
                    out[idx] = prob.cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def save(self, out_dir: Path) -> Path:
        """The adapter (LoRA weights + trained head, peft format) and the manifest."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        _write_manifest(out_dir, self.settings, {"model_folder": self.model_folder, **self.extra})
        return out_dir


def train_lora_detector(
    texts: Sequence[str],
    y: Sequence[int] | np.ndarray,
    *,
    model_folder: str | Path,
    settings: DetectorSettings | None = None,
    seed: int = 0,
    device: str = "auto",
    progress: Progress | None = None,
    sample_weight: np.ndarray | None = None,
) -> LoraDetector:
    """Fine-tune LoRA adapters + a 2-way head with class-balanced cross-entropy, or
    cross-entropy weighted by `sample_weight` ([n], e.g. `row_weights`)."""
    import torch
    from peft import LoraConfig, TaskType

    from tools.models import pick_device

    s = settings or DetectorSettings(kind="lora")
    labels = _check_labels(y, len(texts))
    dev = pick_device(device)
    folder = str(model_folder)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    base, tokenizer = _load_base(folder, dev, seed)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        target_modules=list(s.lora_targets),
    )
    model, params = attach_lora(base, config, dev, seed)

    ids = _tokenize(tokenizer, texts, s.max_length)
    counts = np.bincount(labels, minlength=2)
    if sample_weight is not None and len(sample_weight) != len(labels):
        raise DataError(f"{len(sample_weight)} row weights for {len(labels)} training rows")
    # sklearn's "balanced": n / (2 * n_class); a batch's loss is its weighted mean. Row
    # weights instead divide by the batch's expected weight (batch size x mean weight), so a
    # batch of low-weight rows moves the model little rather than as much as any other.
    w_rows = torch.from_numpy(np.asarray(
        row_weights(labels) if sample_weight is None else sample_weight, dtype=np.float32))
    mean_w = float(w_rows.mean())
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(ids) / s.batch_size)
    total = steps_per_epoch * s.epochs
    optimizer, scheduler = adamw_linear_decay(params, s.lr, total)
    y_t = torch.from_numpy(labels)
    lengths = [len(r) for r in ids]
    done = 0
    model.train()
    for epoch in range(s.epochs):
        running = 0.0
        for batch in length_batches(lengths, s.batch_size, rng):
            x, mask = collate_ids([ids[i] for i in batch], tokenizer.pad_token_id)
            with autocast_for(dev):
                logits = model(input_ids=x.to(dev), attention_mask=mask.to(dev)).logits
            w = w_rows[batch].to(dev)
            per_row = loss_fn(logits.float(), y_t[batch].to(dev))
            norm = w.sum() if sample_weight is None else len(batch) * mean_w
            loss = (w * per_row).sum() / norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
            done += 1
            if progress is not None:
                progress(done, total)
        log.info("lora epoch %d/%d: mean loss %.4f", epoch + 1, s.epochs, running / steps_per_epoch)
    model.eval()
    extra = {"seed": seed, "n_train": len(labels), "n_positive": int(counts[1])}
    return LoraDetector(model, tokenizer, s, folder, extra)


def load_lora_detector(
    folder: Path, settings: DetectorSettings, model_folder: str, device: str = "auto"
) -> LoraDetector:
    from peft import PeftModel

    from tools.models import pick_device

    dev = pick_device(device)
    base, tokenizer = _load_base(model_folder, dev, 0)
    model = PeftModel.from_pretrained(base, str(folder))
    model.to(dev)
    model.eval()
    return LoraDetector(model, tokenizer, settings, model_folder)


# --- one interface -------------------------------------------------------------------------


def _write_manifest(out_dir: Path, settings: DetectorSettings, extra: dict[str, Any]) -> None:
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
        weights = row_weights(_check_labels(labels), synthetic, synthetic_share)
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
    return load_lora_detector(folder, settings, base, device)
