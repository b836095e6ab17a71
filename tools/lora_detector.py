"""The `lora` detector (the paper's): LoRA sequence classification on the causal LM itself
(peft, rank 8 on q_proj/v_proj, the classification head trained in full), class-balanced
cross-entropy (per-row weights when given: `tools.detector.row_weights`), AdamW with linear
decay. It reads texts; features are not used. Built and loaded through
`tools.detector.fit_detector` / `load_detector`; its batching and optimiser helpers are
shared with the adapted generator (tools/adapted.py).

torch, transformers and peft are imported lazily.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tools.detector import (
    DetectorSettings,
    Progress,
    check_labels,
    row_weights,
    write_manifest,
)
from tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)



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
        write_manifest(out_dir, self.settings, {"model_folder": self.model_folder, **self.extra})
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
    labels = check_labels(y, len(texts))
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
