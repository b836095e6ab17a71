"""SAE probe: which features does each text activate, how strongly, and where.

For a text x and feature f, a(x, f) = max over counted tokens of f's SAE activation on
the hooked layer's residual. Counted tokens exclude padding, position 0 (the attention
sink, whose residual norm is an outlier) and, when texts are wrapped in the chat
template, every template token. Texts are bucketed by length, the forward pass stops
at the hooked layer (no later blocks, no LM head), and every text's sparse activations
land in the content-addressed activation cache, so unchanged rows are never re-probed.

A text with no counted token (a one-token text: its only token is position 0; an empty
text; a text that is all template) still gets a record: `n_tokens` tokens, no active
feature, and a mean residual of zeros (d_model): the mean over no tokens is undefined,
and zeros keep `ProbeResult.pooled()` finite and rectangular for the detector. Such texts
skip the forward pass and are cached like any other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from memory.activation_cache import ActivationCache, TextActs, text_key
from tools.errors import ModelError
from tools.models import LoadedModel, Tokenizer
from tools.sae import HookPoint, LoadedSAE, check_fits

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of texts just finished (cached texts included)."""


@dataclass(frozen=True)
class ProbeSettings:
    max_tokens: int = 256
    """Texts longer than this many tokens are truncated (one warning per probe)."""
    batch_tokens: int = 4096
    """Padded tokens per forward batch; batches are bucketed by length."""
    max_batch: int = 64
    chat_template: bool = False
    """Wrap each text as a user turn of the model's chat template."""
    sink_factor: float = 10.0
    """Tokens whose residual norm exceeds this multiple of the text's median token norm
    are secondary attention sinks ("massive activations", ~100x the usual norm in
    SmolLM2): like position 0 they are not counted."""

    def fingerprint(self) -> str:
        return f"max_tokens={self.max_tokens}|chat={self.chat_template}|sink={self.sink_factor}"


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    counted: np.ndarray  # bool [len(ids)]: positions that enter max / pooling
    offsets: list[tuple[int, int]]  # char span of each token in the *text* (template: clipped)
    truncated: bool


def encode(tokenizer: Tokenizer, texts: Sequence[str], settings: ProbeSettings) -> list[Encoded]:
    """Tokenise texts the way the probe feeds them to the model."""
    if not texts:
        return []
    tok = tokenizer
    if settings.chat_template:
        sentinel = "\x00FACSYNTH\x00"
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": sentinel}], tokenize=False
        )
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            raise ModelError("the chat template does not render a user message verbatim")
        prefix, suffix = rendered.split(sentinel)
        full = [prefix + t + suffix for t in texts]
        batch = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        starts = [len(prefix)] * len(texts)
    else:
        batch = tok(list(texts), return_offsets_mapping=True)
        starts = [0] * len(texts)
    out = []
    for text, start, ids, offs in zip(
        texts, starts, batch["input_ids"], batch["offset_mapping"], strict=True
    ):
        end = start + len(text)
        # A token counts when it lies inside the text itself (not the template).
        counted = np.array([s >= start and e <= end and e > s for s, e in offs], dtype=bool)
        if len(counted):
            counted[0] = False  # attention sink
        truncated = len(ids) > settings.max_tokens
        ids, offs, counted = (
            ids[: settings.max_tokens],
            offs[: settings.max_tokens],
            counted[: settings.max_tokens],
        )
        rel = [(max(s - start, 0), max(min(e, end) - start, 0)) for s, e in offs]
        out.append(Encoded(list(ids), counted, rel, truncated))
    return out


def length_buckets(lengths: Sequence[int], settings: ProbeSettings) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length within the padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[i]  # sorted ascending: the newest is the longest
        if batch and (
            width * (len(batch) + 1) > settings.batch_tokens
            or len(batch) >= settings.max_batch
            # few texts of mixed lengths (a re-probe of edited rows) would otherwise share
            # one batch padded to the longest: cap padding at ~25% (+8 tokens)
            or width > 1.25 * lengths[batch[0]] + 8
        ):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class _Stop(Exception):
    """Raised by the hook to end the forward pass at the hooked layer."""


@contextmanager
def _capture(
    model: torch.nn.Module, hooks: Sequence[HookPoint]
) -> Iterator[dict[HookPoint, torch.Tensor]]:
    """Record each hook's tensor; stop the forward pass once all have fired."""
    captured: dict[HookPoint, torch.Tensor] = {}

    def grabber(hook: HookPoint) -> Callable[[object], None]:
        def grab(value: object) -> None:
            # an output hook sees the module's output, a pre-hook its positional args:
            # either the hidden states or a tuple that starts with them
            tensor = value[0] if isinstance(value, tuple) else value
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{hook.module} gave {type(tensor).__name__}, not a tensor")
            captured[hook] = tensor
            if len(captured) == len(hooks):
                raise _Stop

        return grab

    handles = []
    for hook in hooks:
        module = model.get_submodule(hook.module)
        grab = grabber(hook)
        if hook.side == "output":
            handles.append(module.register_forward_hook(lambda _m, _i, out, g=grab: g(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, g=grab: g(args)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def drop_sinks(resid: torch.Tensor, counted: torch.Tensor, factor: float) -> torch.Tensor:
    """[B, T] counted mask without tokens whose norm is > factor x the text's median."""
    norms: torch.Tensor = resid.norm(dim=-1).masked_fill(~counted, float("nan"))
    median: torch.Tensor = norms.nanmedian(dim=1, keepdim=True).values
    return counted & ~(norms > median * factor)


def residuals(
    lm: LoadedModel,
    hooks: Sequence[HookPoint],
    batch: Sequence[Encoded],
    sink_factor: float = ProbeSettings.sink_factor,
) -> tuple[dict[HookPoint, torch.Tensor], torch.Tensor]:
    """Right-padded forward until every hook fired: ({hook: [B, T, d] fp32}, [B, T] counted).
    A token counted at one hook but a sink at another is dropped everywhere."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    counted = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        attn[row, : len(e.ids)] = 1
        counted[row, : len(e.ids)] = torch.from_numpy(e.counted)
    with _capture(lm.model, hooks) as captured, torch.inference_mode():
        try:
            lm.model.base_model(
                input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device), use_cache=False
            )
        except _Stop:
            pass
    missing = [h.module for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} never fired: are they inside the base model?")
    resid = {h: t.float() for h, t in captured.items()}
    counted = counted.to(lm.device)
    for r in resid.values():
        counted = drop_sinks(r, counted, sink_factor)
    return resid, counted


def _encode_chunked(sae: LoadedSAE, x: torch.Tensor) -> torch.Tensor:
    # Bound the dense [n, d_sae] block (~256 MB) so 65k-wide SAEs fit in memory.
    step = max(1, (1 << 26) // sae.d_sae)
    if len(x) == 0:  # no counted token in the whole batch
        return torch.zeros((0, sae.d_sae), dtype=torch.float32, device=x.device)
    return torch.cat([sae.encode(x[i : i + step]) for i in range(0, len(x), step)])


def _no_tokens(e: Encoded, d_model: int, n_saes: int) -> list[TextActs]:
    """The record of a text without counted tokens (see the module doc)."""
    empty_i = np.zeros(0, dtype=np.int32)
    acts = TextActs(n_tokens=len(e.ids), pos=empty_i, feat=empty_i,
                    val=np.zeros(0, dtype=np.float32), pooled=np.zeros(d_model, dtype=np.float32))
    return [acts] * n_saes


def probe_batch(
    lm: LoadedModel, saes: Sequence[LoadedSAE], batch: Sequence[Encoded], sink_factor: float
) -> list[list[TextActs]]:
    """One forward pass for SAEs that share a hook; per SAE, each text's activations.
    Texts without a counted token skip the forward pass (empty record, zero mean)."""
    (hook,) = {sae.hook for sae in saes}
    live = [b for b, e in enumerate(batch) if e.counted.any()]
    d_model = saes[0].d_in
    out: list[list[TextActs]] = [
        [] if e.counted.any() else _no_tokens(e, d_model, len(saes))
        for e in batch
    ]
    if live:
        for b, acts in zip(live, _probe_live(lm, saes, hook, [batch[b] for b in live],
                                             sink_factor), strict=True):
            out[b] = acts
    return [[per_text[s] for per_text in out] for s in range(len(saes))]


def _probe_live(
    lm: LoadedModel, saes: Sequence[LoadedSAE], hook: HookPoint, batch: Sequence[Encoded],
    sink_factor: float,
) -> list[list[TextActs]]:
    """Per text, per SAE: activations of texts that have counted tokens."""
    captured, counted = residuals(lm, [hook], batch, sink_factor)
    resid = captured[hook]
    rows, cols = counted.nonzero(as_tuple=True)
    n_counted = counted.sum(dim=1, keepdim=True).clamp(min=1)
    # where(), not a product: a padded position's residual may be non-finite
    kept = torch.where(counted.unsqueeze(-1), resid, torch.zeros((), device=resid.device))
    pooled = (kept.sum(dim=1) / n_counted).cpu().numpy()
    per_text: list[list[TextActs]] = [[] for _ in batch]
    for sae in saes:
        feats = _encode_chunked(sae, resid[rows, cols])  # [N, d_sae]
        nz_tok, nz_feat = feats.nonzero(as_tuple=True)
        text_of = rows[nz_tok].cpu().numpy()
        pos_of = cols[nz_tok].cpu().numpy().astype(np.int32)
        feat_np = nz_feat.cpu().numpy().astype(np.int32)
        val_np = feats[nz_tok, nz_feat].cpu().numpy().astype(np.float32)
        bounds = np.searchsorted(text_of, np.arange(len(batch) + 1))  # nonzero() is row-major
        for b, e in enumerate(batch):
            per_text[b].append(TextActs(
                n_tokens=len(e.ids),
                pos=pos_of[bounds[b] : bounds[b + 1]],
                feat=feat_np[bounds[b] : bounds[b + 1]],
                val=val_np[bounds[b] : bounds[b + 1]],
                pooled=pooled[b].astype(np.float32),
            ))
    return per_text


@dataclass
class ProbeResult:
    """Per-text sparse activations of a probed dataset, in input order."""

    acts: list[TextActs]
    d_sae: int

    def _triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, feature, value, position) of every stored activation, concatenated."""
        if not self.acts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty.astype(np.float32), empty
        row = np.concatenate([np.full(len(a.feat), i) for i, a in enumerate(self.acts)])
        feat = np.concatenate([a.feat for a in self.acts]).astype(np.int64)
        val = np.concatenate([a.val for a in self.acts])
        pos = np.concatenate([a.pos for a in self.acts])
        return row, feat, val, pos

    def _max_triples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, feature, max value, peak position) for every active (text, feature)."""
        row, feat, val, pos = self._triples()
        key = row * self.d_sae + feat
        order = np.lexsort((-val, key))  # by key, then strongest first
        _, first = np.unique(key[order], return_index=True)
        pick = order[first]
        return row[pick], feat[pick], val[pick], pos[pick]

    def max_matrix(self) -> sp.csr_matrix:
        """[n_texts, d_sae] max activation over counted tokens (sparse)."""
        row, feat, val, _ = self._max_triples()
        return sp.csr_matrix((val, (row, feat)), shape=(len(self.acts), self.d_sae))

    def peak_positions(self) -> sp.csr_matrix:
        """[n_texts, d_sae] token position of each max (+1, so position 0 stays stored)."""
        row, feat, _, pos = self._max_triples()
        return sp.csr_matrix((pos + 1, (row, feat)), shape=(len(self.acts), self.d_sae))

    def count_matrix(self, delta: float | np.ndarray) -> sp.csr_matrix:
        """[n_texts, d_sae] number of counted tokens with activation > delta (a scalar or
        one threshold per feature)."""
        row, feat, val, _ = self._triples()
        keep = val > (delta[feat] if isinstance(delta, np.ndarray) else delta)
        ones = np.ones(int(keep.sum()), dtype=np.float32)
        m = sp.csr_matrix((ones, (row[keep], feat[keep])), shape=(len(self.acts), self.d_sae))
        m.sum_duplicates()
        return m

    def pooled(self) -> np.ndarray:
        """[n_texts, d_model] mean residual over counted tokens."""
        return np.stack([a.pooled for a in self.acts])


def cache_namespace(lm: LoadedModel, sae: LoadedSAE, settings: ProbeSettings) -> str:
    ident = f"v1|{lm.identity}|{sae.identity}|{sae.hook}|{settings.fingerprint()}"
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def probe_texts(
    texts: Sequence[str],
    lm: LoadedModel,
    sae: LoadedSAE,
    settings: ProbeSettings = ProbeSettings(),
    *,
    cache: ActivationCache | None = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """Probe texts (through the cache when given) and return their activations."""
    return probe_many(texts, lm, [sae], settings, caches=[cache], progress=progress)[0]


def probe_many(
    texts: Sequence[str],
    lm: LoadedModel,
    saes: Sequence[LoadedSAE],
    settings: ProbeSettings = ProbeSettings(),
    *,
    caches: Sequence[ActivationCache | None] | None = None,
    progress: Progress | None = None,
) -> list[ProbeResult]:
    """Probe texts for several SAEs on the same hook with one forward pass per batch
    (e.g. SAEs of different widths); a text missing from any cache is probed for all."""
    if len({sae.hook for sae in saes}) != 1:
        raise ValueError("probe_many needs SAEs that read the same hook; group them first")
    for sae in saes:
        check_fits(sae, lm.model)
    stores = list(caches) if caches is not None else [None] * len(saes)
    keys = [text_key(t) for t in texts]
    known: list[dict[bytes, TextActs]] = [c.get_many(keys) if c else {} for c in stores]
    todo_keys = list(dict.fromkeys(k for k in keys if any(k not in kn for kn in known)))
    multiplicity = dict.fromkeys(todo_keys, 0)
    for k in keys:
        if k in multiplicity:
            multiplicity[k] += 1
    if progress:
        progress(len(texts) - sum(multiplicity.values()))
    first_text = dict(zip(keys, texts, strict=True))
    encoded = encode(lm.tokenizer, [first_text[k] for k in todo_keys], settings)
    n_trunc = sum(e.truncated for e in encoded)
    if n_trunc:
        log.warning(
            "%d of %d texts are longer than max_tokens=%d and were truncated",
            n_trunc, len(encoded), settings.max_tokens,
        )
    for idx in length_buckets([len(e.ids) for e in encoded], settings):
        per_sae = probe_batch(lm, saes, [encoded[i] for i in idx], settings.sink_factor)
        for acts, cache, kn in zip(per_sae, stores, known, strict=True):
            fresh = {todo_keys[i]: a for i, a in zip(idx, acts, strict=True)}
            if cache is not None:
                cache.put_many(fresh)
            kn.update(fresh)
        if progress:
            progress(sum(multiplicity[todo_keys[i]] for i in idx))
    return [
        ProbeResult(acts=[kn[k] for k in keys], d_sae=sae.d_sae)
        for kn, sae in zip(known, saes, strict=True)
    ]


@torch.no_grad()
def reference_max_acts(
    texts: Sequence[str],
    lm: LoadedModel,
    sae: LoadedSAE,
    settings: ProbeSettings = ProbeSettings(),
    batch_size: int = 16,
) -> np.ndarray:
    """The naive way, kept as the probe's reference in tests and benchmarks: full model
    forward with all hidden states, fixed-size batches in input order, then the SAE.
    Returns dense [n_texts, d_sae] max activations."""
    layer = sae.hook.layer
    encoded = encode(lm.tokenizer, texts, settings)
    out = np.zeros((len(texts), sae.d_sae), dtype=np.float32)
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), lm.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            attn[row, : len(e.ids)] = 1
        hidden = lm.model(
            input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device),
            output_hidden_states=True,
        ).hidden_states[layer + 1]  # [0] is the embeddings
        for row, e in enumerate(batch):
            resid = hidden[row : row + 1, : len(e.ids)].float()
            counted = torch.from_numpy(e.counted).to(lm.device)[None]
            counted = drop_sinks(resid, counted, settings.sink_factor)[0]
            if counted.any():
                acts = sae.encode(resid[0][counted])
                out[start + row] = acts.max(dim=0).values.clamp(min=0).cpu().numpy()
    return out


def top_spans(
    result: ProbeResult,
    texts: Sequence[str],
    tokenizer: Tokenizer,
    settings: ProbeSettings,
    features: Sequence[int],
    n: int,
    window: int,
) -> dict[int, list[tuple[int, str, float]]]:
    """Per feature, its n strongest rows as (row, span text, activation); the span is the
    `window` tokens ending at the peak token, cut from the original text."""
    if not features or n == 0:
        return {}
    maxes = result.max_matrix().tocsc()
    peaks = result.peak_positions().tocsc()
    chosen: dict[int, list[tuple[int, int, float]]] = {}
    for f in features:
        col = maxes.getcol(f)
        rows, vals = col.indices, col.data
        order = np.argsort(-vals)[:n]
        pk = peaks.getcol(f)
        peak_of = dict(zip(pk.indices, pk.data - 1, strict=True))
        chosen[f] = [(int(rows[i]), int(peak_of[rows[i]]), float(vals[i])) for i in order]
    needed = sorted({r for picks in chosen.values() for r, _, _ in picks})
    enc = dict(zip(needed, encode(tokenizer, [texts[r] for r in needed], settings), strict=True))
    out: dict[int, list[tuple[int, str, float]]] = {}
    for f, picks in chosen.items():
        spans = []
        for row, peak, val in picks:
            offs = enc[row].offsets
            start = offs[max(0, peak - window + 1)][0]
            spans.append((row, texts[row][start : offs[peak][1]], val))
        out[f] = spans
    return out
