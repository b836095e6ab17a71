"""The adapted generator: a LoRA on the embedded model, trained once per anchor to write a
row of a given label on a given theme, so a small model writes in the task's own style.

Each anchor row becomes one training string (`adapter_examples`): the raw completion prompt
`prompts/generate_adapted.v1.md` for the row's label and theme, then " " + the row:

    Label: harmful
    Theme: <a span of the row's strongest active task feature, cut from ANOTHER anchor row>
    Message: <the row, at most max_chars characters>

and the tokenizer's eos. The theme comes from another row where the feature has one, so the
adapter learns theme -> a new text rather than to copy the span's own row. A row with no
active task feature (most negatives: task features lean positive by construction) takes its
strongest active feature of any kind, so "harmless + theme" is learnt too, which the
contrastive generator asks for. The loss covers the message and eos only; the prompt is
tokenised alone, exactly as `LocalChat` tokenises it when generating.

Training (`train_adapter`): peft LoRA on every linear projection of the Llama-style model,
AdamW with linear decay (tools/detector.py's helpers), one epoch over at most
`max_examples` strings, positives first and twice (they are rare). `ensure_adapter` trains
once per (model, examples, settings) under `FACSYNTH_HOME/adapters/`, atomically and under
a lock (tools/models.py `build_once`); later runs, resumes and seeds reuse it. Measured on
2 idle cores, ToxicChat dev pool (bench/adapted_generator.py): 562 examples, 32.9k tokens in
185 s (178 tokens/s; message loss 4.43 -> 3.95); the 600 default is ~35k tokens.

Generation (`AdaptedChat`): the base model with the adapter merged, behind `LocalChat`'s
batched, per-request seeded sampling; `achat` ignores the system prompt and continues
`user` as raw text, stopping at eos (or where the model starts a new "Label:" line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from prompts import render
from tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tools.data import TextDataset
    from tools.local_llm import LocalChat
    from tools.workspace import Workspace

log = logging.getLogger(__name__)

PROMPT = "generate_adapted.v1"
MARKER = "\nMessage:"
"""Where the prompt ends in a training string (themes are one line, so the first one)."""
MANIFEST = "adapter.json"
NEXT_ROW = re.compile(r"\n\s*Label:")

Progress = Callable[[int, int], None]
"""Called as progress(done, total) with optimizer steps done of all steps."""


class AdapterSettings(BaseModel):
    """The adapted generator's LoRA and its training (part of the adapter's cache key)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="adapter scale numerator")
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                "up_proj", "down_proj")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (linear decay)")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    max_tokens: int = Field(128, ge=8, description="tokens per training string (truncated)")
    max_chars: int = Field(400, ge=20, description="characters of a row's text kept")
    max_examples: int = Field(
        600, ge=2, description="training strings at most: ~5 minutes on 2 CPU cores")
    positive_repeats: int = Field(
        2, ge=1, description="copies of each positive row (rare), up to half the examples")
    seed: int = 0


# --- training strings ----------------------------------------------------------------------


def _truncate(text: str, max_chars: int) -> str:
    """At most max_chars characters, cut at a space when one is near the end."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > max_chars * 0.6 else max_chars].rstrip()


def adapter_examples(
    texts: Sequence[str],
    labels: Sequence[int],
    themes: Sequence[int | None],
    spans: Mapping[int, Sequence[tuple[int, str]]],
    *,
    max_chars: int = 400,
    seed: int = 0,
) -> list[str]:
    """One training string per row (see the module doc), without eos (the trainer adds the
    tokenizer's). `themes[i]`: the feature row i is about (None: no theme); `spans[f]`: the
    feature's top anchor spans as (row, text). Row i's theme is a span of `themes[i]` from
    another row, drawn with a per-row seed; its own span only when no other row has one."""
    if not len(texts) == len(labels) == len(themes):
        raise DataError(f"{len(texts)} texts, {len(labels)} labels, {len(themes)} themes")
    out = []
    for i, (text, label, feature) in enumerate(zip(texts, labels, themes, strict=True)):
        found = spans.get(feature, []) if feature is not None else []
        others = [t for row, t in found if row != i] or [t for _, t in found]
        theme = random.Random(f"{seed}:{i}").choice(others) if others else ""
        prompt = render(PROMPT, label=label, spans=[theme] if theme else [], summary="", k=0)
        out.append(f"{prompt} {_truncate(text, max_chars)}")
    return out


def pick_examples(
    examples: Sequence[str], labels: Sequence[int], settings: AdapterSettings
) -> list[str]:
    """At most `max_examples`: every positive `positive_repeats` times (up to half of them),
    then negatives, each group in a seeded random order."""
    rng = random.Random(settings.seed)
    pos = [i for i, y in enumerate(labels) if y == 1]
    neg = [i for i, y in enumerate(labels) if y != 1]
    rng.shuffle(pos)
    rng.shuffle(neg)
    copies = (pos * settings.positive_repeats)[: settings.max_examples // 2]
    chosen = copies + neg[: settings.max_examples - len(copies)]
    if len(chosen) < settings.max_examples:  # few negatives: more positive copies
        chosen += (pos * settings.positive_repeats)[len(copies):][
            : settings.max_examples - len(chosen)]
    return [examples[i] for i in chosen]


def anchor_themes(
    ws: Workspace, anchor: TextDataset, n_spans: int = 4
) -> tuple[list[int | None], dict[int, list[tuple[int, str]]]]:
    """(per anchor row, its strongest active task feature, else its strongest active
    feature, None when none is active; per such feature, its top `n_spans` anchor spans as
    (row, text)), under the workspace's activity rule and label judge."""
    import numpy as np

    from tools.probe import top_spans

    cov = ws.measure(anchor, anchor)  # the anchor's activity and F_task
    acts = ws.probe(anchor)
    strength = acts.max_matrix().multiply(cov.anchor_active).tocsr()  # [rows, d_sae]
    themes: list[int | None] = []
    for i in range(strength.shape[0]):
        lo, hi = strength.indptr[i], strength.indptr[i + 1]
        features, values = strength.indices[lo:hi], strength.data[lo:hi]
        if not len(features):
            themes.append(None)
            continue
        task = cov.task[features]
        pool = np.where(task, values, -np.inf) if task.any() else values
        themes.append(int(features[int(np.argmax(pool))]))
    wanted = sorted({f for f in themes if f is not None})
    got = top_spans(acts, anchor.texts, ws.model.tokenizer, ws.settings.probe_settings(),
                    wanted, n_spans, ws.settings.span_window)
    return themes, {f: [(row, text) for row, text, _ in v] for f, v in got.items()}


# --- training and the cache ------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """As `LocalChat._ids` tokenises a prompt it continues (BOS added when the tokenizer
    has one), so training sees what generation will."""
    return list(tokenizer(prompt, add_special_tokens=bool(tokenizer.bos_token))["input_ids"])


def encode_example(tokenizer: Any, example: str, max_tokens: int) -> tuple[list[int], int]:
    """(token ids, prompt length): the prompt tokenised alone, then " message" and eos; a
    message too long for max_tokens is cut and then gets no eos (it did not end there)."""
    head, sep, message = example.partition(MARKER)
    if not sep:
        raise DataError(f"not an adapter training string (no {MARKER!r}): {example[:80]!r}")
    prompt = _prompt_ids(tokenizer, head + sep)
    body = list(tokenizer(message, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    room = max_tokens - len(prompt)
    if room < 1:
        raise DataError(f"a prompt of {len(prompt)} tokens leaves no room for the message in "
                        f"max_tokens={max_tokens}")
    if eos is not None and len(body) < room:
        body.append(eos)
    return prompt + body[:room], len(prompt)


class AdapterInfo(BaseModel):
    """What one adapter training did (saved as adapter.json beside the weights)."""

    settings: AdapterSettings
    model: str
    n_examples: int
    n_positive_prompts: int
    tokens: int
    steps: int
    seconds: float
    tokens_per_s: float
    first_loss: float
    last_loss: float


def train_adapter(
    model_folder: str | Path,
    examples: Sequence[str],
    settings: AdapterSettings,
    out_dir: Path,
    *,
    device: str = "auto",
    progress: Progress | None = None,
) -> AdapterInfo:
    """Fine-tune a causal-LM LoRA on `examples` (training strings) and save it (peft format)
    with `adapter.json` into out_dir (written last: its presence marks a whole adapter)."""
    import torch
    from peft import LoraConfig, TaskType

    from tools.lora_detector import adamw_linear_decay, attach_lora, autocast_for, collate_ids
    from tools.lora_detector import length_batches as batches_of
    from tools.models import load_model

    if not examples:
        raise DataError("no training strings for the adapter")
    s = settings
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    # a folder or hub id (a profile name is resolved by the caller): no cache dir used
    lm = load_model(str(model_folder), cache_dir=out_dir.parent, device=device)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=s.r, lora_alpha=s.alpha,
                        lora_dropout=s.dropout, target_modules=list(s.targets))
    model, params = attach_lora(lm.model, config, lm.device, s.seed)
    encoded = [encode_example(lm.tokenizer, e, s.max_tokens) for e in examples]
    lengths = [len(ids) for ids, _ in encoded]
    total = math.ceil(len(encoded) / s.batch_size) * s.epochs
    optimizer, scheduler = adamw_linear_decay(params, s.lr, total)
    rng = random.Random(s.seed)
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    for _ in range(s.epochs):
        for batch in batches_of(lengths, s.batch_size, rng):
            x, mask = collate_ids([encoded[i][0] for i in batch], lm.tokenizer.pad_token_id)
            target = x.masked_fill(mask == 0, -100)
            for row, i in enumerate(batch):  # no loss on the prompt
                target[row, : encoded[i][1]] = -100
            with autocast_for(lm.device):
                loss = model(input_ids=x.to(lm.device), attention_mask=mask.to(lm.device),
                             labels=target.to(lm.device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), total)
    seconds = time.monotonic() - started
    model.eval()
    model.save_pretrained(out_dir)
    tokens = sum(lengths) * s.epochs
    info = AdapterInfo(
        settings=s, model=str(model_folder), n_examples=len(examples),
        n_positive_prompts=sum(e.startswith("Label: harmful") for e in examples),
        tokens=tokens, steps=len(losses), seconds=round(seconds, 2),
        tokens_per_s=round(tokens / max(seconds, 1e-9), 1),
        first_loss=losses[0], last_loss=sum(losses[-10:]) / len(losses[-10:]),
    )
    (out_dir / MANIFEST).write_text(info.model_dump_json(indent=2) + "\n")
    log.info("adapter: %d examples, %d tokens in %.0f s (%.0f tokens/s), loss %.3f -> %.3f",
             info.n_examples, tokens, seconds, info.tokens_per_s, info.first_loss,
             info.last_loss)
    return info


def adapter_dir(
    home: Path, model_identity: str, examples: Sequence[str], settings: AdapterSettings
) -> Path:
    """Where the adapter for these exact training strings (anchor rows, labels and themes),
    settings and base weights lives: `home/adapters/<model>-<hash>`."""
    content = json.dumps([model_identity, settings.model_dump(mode="json"), list(examples)])
    key = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
    # "smollm2-135m:<gguf>", "local:/path/name" or "org/name" -> smollm2-135m, name, name
    name = model_identity.rstrip("/").split("/")[-1].split(":")[0]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "model"
    return home / "adapters" / f"{slug}-{key}"


def ensure_adapter(
    home: Path,
    model_folder: str | Path,
    model_identity: str,
    examples: Sequence[str],
    settings: AdapterSettings,
    *,
    device: str = "auto",
    progress: Progress | None = None,
) -> Path:
    """The cached adapter for these examples, trained first when absent (once, atomically,
    under a lock: concurrent runs wait for one training)."""
    from tools.models import build_once

    target = adapter_dir(home, model_identity, examples, settings)

    def build(tmp: Path) -> None:
        train_adapter(model_folder, examples, settings, tmp, device=device, progress=progress)

    return build_once(target, build, lambda p: (p / MANIFEST).exists())


def read_info(folder: Path) -> AdapterInfo:
    return AdapterInfo.model_validate_json((folder / MANIFEST).read_text())


# --- generation ----------------------------------------------------------------------------


class AdaptedChat:
    """The generator's `AsyncChatClient` over a base model with a trained adapter merged
    in: `achat` continues `user` (a `generate_adapted.v1` prompt) as raw text."""

    def __init__(self, local: LocalChat) -> None:
        self.local = local
        self.name = local.name

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        """The message the adapter writes after `user` (system is ignored: the adapter was
        trained without one), cut where it starts another "Label:" line."""
        reply = await self.local.acomplete(user, temperature=temperature, seed=seed)
        return NEXT_ROW.split(reply, maxsplit=1)[0].strip()


def load_adapted(
    model_folder: str | Path,
    adapter: Path,
    *,
    cache_dir: Path,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 96,
) -> AdaptedChat:
    """An `AdaptedChat` over `model_folder` with the adapter in `adapter` merged in."""
    from peft import PeftModel

    from tools.local_llm import LocalChat
    from tools.models import load_model

    if not (adapter / MANIFEST).exists():
        raise ConfigError(f"{adapter} is not a trained adapter (no {MANIFEST})")
    lm = load_model(str(model_folder), cache_dir=cache_dir, device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(lm.model, str(adapter)).merge_and_unload()
    merged.eval()
    lm = replace(lm, model=merged, identity=f"{lm.identity}+{adapter.name}")
    return AdaptedChat(LocalChat(lm, max_new_tokens=max_new_tokens,
                                 name=f"adapted:{adapter.name}"))


def adapted_client(
    ws: Workspace,
    anchor: TextDataset,
    settings: AdapterSettings | None = None,
    *,
    progress: Progress | None = None,
) -> AdaptedChat:
    """The adapted generator for an anchor: themes from the workspace's coverage, the
    cached adapter (trained now when absent), merged into a fresh copy of the model."""
    from tools.models import resolve_model_source

    s = settings or AdapterSettings()
    if anchor.labels is None:
        raise ConfigError("the adapted generator learns from labelled anchor rows: this "
                          "anchor has no labels")
    folder, identity = resolve_model_source(ws.settings.model, ws.settings.home)
    themes, spans = anchor_themes(ws, anchor)
    examples = adapter_examples(anchor.texts, anchor.labels, themes, spans,
                                max_chars=s.max_chars, seed=s.seed)
    chosen = pick_examples(examples, anchor.labels, s)
    path = ensure_adapter(ws.settings.home, folder, identity, chosen, s,
                          device=ws.settings.device, progress=progress)
    return load_adapted(folder, path, cache_dir=ws.settings.home, device=ws.settings.device,
                        dtype=ws.settings.dtype, max_new_tokens=ws.settings.max_new_tokens)
