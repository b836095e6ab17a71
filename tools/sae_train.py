"""Train a TopK SAE on one layer of a model with sae-lens, resumably.

Two phases, both restartable after a kill:
1. collect: counted-token residuals (position 0 and padding dropped, as in the probe)
   go to an fp16 memmap per hook; `collect.json` records how many texts and vectors are
   in, and is replaced atomically after each flushed batch.
2. train: sae-lens `SAETrainer` over shuffled batches of the store, checkpointing with
   its own trainer state; a restart loads the newest checkpoint and skips the samples
   it already saw. The activation norm scaling is estimated by sae-lens and folded into
   the weights, so the saved SAE takes raw residuals.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.data import write_text_atomic
from tools.errors import ConfigError
from tools.models import LoadedModel
from tools.probe import ProbeSettings, encode, length_buckets, residuals
from tools.sae import HookPoint

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as (phase, done, total)."""


@dataclass(frozen=True)
class TrainSettings:
    d_sae: int = 4096
    k: int = 32
    n_vectors: int = 500_000
    epochs: float = 1.0
    batch_size: int = 512
    lr: float = 2e-3
    """measured on SmolLM2 layer 8, 150k vectors: lr 4e-4 -> EV 0.41, 2e-3 -> 0.85"""
    heldout_frac: float = 0.05
    seed: int = 0
    n_checkpoints: int = 4
    chunk_texts: int = 256
    """texts per resumable collection step"""
    probe: ProbeSettings = ProbeSettings(max_tokens=128)


def _store_path(out_dir: Path, hook: HookPoint) -> Path:
    return out_dir / "activations" / f"{hook.module}-{hook.side}.f16"


def collect(
    lm: LoadedModel,
    hooks: Sequence[HookPoint],
    texts: Sequence[str],
    out_dir: Path,
    settings: TrainSettings,
    progress: Progress | None = None,
) -> int:
    """Fill the activation stores (resuming if present); returns vectors stored."""
    (out_dir / "activations").mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "activations" / "collect.json"
    state = {"texts": 0, "vectors": 0}
    if state_path.exists():
        state = json.loads(state_path.read_text())
    d = lm.model.config.hidden_size
    stores = {
        h: np.memmap(
            _store_path(out_dir, h), dtype=np.float16,
            mode="r+" if _store_path(out_dir, h).exists() else "w+",
            shape=(settings.n_vectors, d),
        )
        for h in hooks
    }
    order = list(range(len(texts)))
    random.Random(settings.seed).shuffle(order)
    chunk = settings.chunk_texts
    while state["texts"] < len(order) and state["vectors"] < settings.n_vectors:
        sel = [texts[i] for i in order[state["texts"] : state["texts"] + chunk]]
        encoded = encode(lm.tokenizer, sel, settings.probe)
        for idx in length_buckets([len(e.ids) for e in encoded], settings.probe):
            captured, counted = residuals(
                lm, hooks, [encoded[i] for i in idx], settings.probe.sink_factor
            )
            n = min(int(counted.sum()), settings.n_vectors - state["vectors"])
            for h in hooks:
                vecs = captured[h][counted][:n].cpu().numpy().astype(np.float16)
                stores[h][state["vectors"] : state["vectors"] + n] = vecs
            state["vectors"] += n
        for store in stores.values():
            store.flush()
        state["texts"] += len(sel)
        write_text_atomic(state_path, json.dumps(state))
        if progress:
            progress("collect", state["vectors"], settings.n_vectors)
    return int(state["vectors"])


def _batches(
    store: np.ndarray, rows: np.ndarray, batch_size: int, seed: int, skip: int
) -> Iterator[torch.Tensor]:
    """Endless shuffled fp32 batches over `rows`, skipping the first `skip` samples."""
    epoch = 0
    while True:
        perm = np.random.default_rng(seed + epoch).permutation(rows)
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            if skip >= batch_size:
                skip -= batch_size
                continue
            idx = np.sort(perm[start : start + batch_size])
            yield torch.from_numpy(np.asarray(store[idx], dtype=np.float32))
        epoch += 1


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(found, key=lambda p: int(p.name)) if found else None


def train(
    hook: HookPoint,
    n_vectors: int,
    d_in: int,
    out_dir: Path,
    settings: TrainSettings,
    model_name: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or resume) a TopK SAE on a collected store; save it in sae-lens format
    under `out_dir/sae`, and return held-out metrics."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(settings.seed)
    store = np.memmap(_store_path(out_dir, hook), dtype=np.float16, mode="r").reshape(-1, d_in)
    rng = np.random.default_rng(settings.seed)
    all_rows = rng.permutation(n_vectors)
    n_held = max(1, int(n_vectors * settings.heldout_frac))
    held, train_rows = np.sort(all_rows[:n_held]), all_rows[n_held:]

    cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=settings.d_sae, k=settings.k,
        normalize_activations="expected_average_only_in",
    )
    if hook.side != "output":
        raise ValueError("SAEs are trained on block outputs (resid_post)")
    cfg.metadata.hook_name = hook.module
    cfg.metadata.model_name = model_name
    ckpt_dir = out_dir / "checkpoints"
    total = int(len(train_rows) * settings.epochs) // settings.batch_size * settings.batch_size
    if total < 10 * settings.batch_size:
        raise ConfigError(
            f"{len(train_rows)} training vectors x {settings.epochs} epochs give fewer than 10 "
            f"steps at batch size {settings.batch_size}: collect more vectors or lower the "
            "batch size"
        )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total, train_batch_size_samples=settings.batch_size,
        lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=20, n_checkpoints=settings.n_checkpoints,
        checkpoint_path=str(ckpt_dir), device="cpu",
        dead_feature_window=max(50, total // settings.batch_size // 4),
    )
    latest = _latest_checkpoint(ckpt_dir)
    sae = TopKTrainingSAE.load_from_disk(latest) if latest else TopKTrainingSAE(cfg)
    skip = int(latest.name) if latest else 0
    data = _batches(store, train_rows, settings.batch_size, settings.seed, skip)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    if latest:
        log.info("resuming SAE training from %s", latest)
        trainer.load_trainer_state(latest)
    else:
        # The residual has a large mean (norm ~0.7 of the typical token's in SmolLM2);
        # a zero-initialised decoder bias cannot learn it within a few hundred Adam
        # steps, so start it at the data mean. The scale is sae-lens's own
        # (sqrt(d_in) / mean norm), set here so both use the same sample.
        sample = torch.from_numpy(np.asarray(store[np.sort(train_rows[:20_000])], np.float32))
        scale = float(d_in**0.5 / sample.norm(dim=-1).mean())
        trainer.activation_scaler.scaling_factor = scale
        with torch.no_grad():
            sae.b_dec.copy_(sample.mean(dim=0) * scale)
    with torch.enable_grad():  # callers may have disabled grad globally
        trainer.fit()
    metrics = evaluate(sae, np.asarray(store[held], dtype=np.float32))
    sae_dir = out_dir / "sae"
    sae.save_inference_model(sae_dir)
    _to_fp16(sae_dir)
    if progress:
        progress("train", total, total)
    return {**metrics, "train_vectors": int(len(train_rows)), "heldout_vectors": int(n_held),
            "train_samples_seen": total, **{f"setting_{k}": v for k, v in asdict(settings).items()
                                           if k not in ("probe", "chunk_texts")}}


@torch.no_grad()
def evaluate(sae: Any, x: np.ndarray) -> dict[str, float]:
    """Held-out explained variance, dead-latent fraction and L0 of an SAE on raw residuals."""
    xs = torch.from_numpy(x)
    err = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    l0 = 0.0
    for start in range(0, len(xs), 8192):
        batch = xs[start : start + 8192]
        feats = sae.encode(batch)
        recon = sae.decode(feats)
        err += float(((recon - batch) ** 2).sum())
        fired |= (feats > 0).any(dim=0)
        l0 += float((feats > 0).sum())
    total = float(((xs - xs.mean(dim=0)) ** 2).sum())
    return {
        "explained_variance": 1 - err / total,
        "dead_fraction": float((~fired).float().mean()),
        "l0": l0 / len(xs),
    }


def _to_fp16(sae_dir: Path) -> None:
    """Store weights in fp16 (halves the shipped size; load_sae upcasts to fp32)."""
    from safetensors.torch import load_file, save_file

    weights = sae_dir / "sae_weights.safetensors"
    tensors = {k: v.half() for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    cfg_path = sae_dir / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float16"
    write_text_atomic(cfg_path, json.dumps(cfg, indent=2))


def sae_card(metrics: dict[str, Any], info: dict[str, Any]) -> str:
    """A short model card (markdown) from training metrics and provenance."""
    fields = {k: v for k, v in info.items() if k != "command"}
    rows = "\n".join(f"| {k} | {v} |" for k, v in fields.items())
    quality = "\n".join(
        f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in metrics.items()
    )
    return (
        f"# SAE card\n\nTopK SAE trained with sae-lens by facsynth.\n\n"
        f"Made by:\n\n```\n{info.get('command', '')}\n```\n\n"
        f"| field | value |\n|---|---|\n{rows}\n\n"
        f"## Held-out quality and training settings\n\n| metric | value |\n|---|---|\n"
        f"{quality}\n"
    )
