"""Behaviour steering: A/B questions where one option shows a behaviour -> a Contrastive
Activation Addition vector (CAA, Rimsky et al. 2024), scored by how far adding it moves the
model's answers (SCR = accuracy at +multiplier minus accuracy at -multiplier).

Rows are `PairDataset`s: `prompts[i]` is the full question with its options ("(A) ...",
"(B) ...", up to eight), `chosen[i]` the letter of the option that shows the behaviour
("(A)"), `rejected[i]` the letter of one that does not ("(B)").

The model sees each question as the user turn of its chat template, then an assistant turn
that opens with "(" and the letter. The answer position is the first token where the two
answers' token sequences differ (the letter after "(" in SmolLM2; a merged "(A" token
elsewhere), so nothing depends on how a tokenizer splits "(A)".

The vector: v = the (pair-weighted) mean over training pairs of h_L(matching answer) -
h_L(not-matching answer), h_L the output of decoder layer L at the answer position. Each
pair enters in both orders, as written and with the two options' texts swapped (the
behaviour then sits behind the other letter), so v does not learn a letter. Steering adds
c * v to layer L's output at every position (a forward hook, removed afterwards).

The metric, per question in both orders: the model answers with the behaviour when its
logit for the matching letter beats the not-matching one at the answer position. Accuracy
is the share of such answers over both orders (a model that always says "(A)" scores 0.5),
unsteered (`acc_zero`) and steered at +/- the vector's multiplier (`acc_plus`, `acc_minus`).

The probe reads each pair as two texts: the end of the question's stem (without its
options) + "\\nAnswer: " + an option's words, matching (1) and not matching (0), so F_task =
features of behaviour-matching answers vs the others.

The language model is not a frozen-feature function: bind the task to a workspace
(`task.bind(ws)`) before fitting; `features` arguments are accepted for the common
signature and ignored. The model is shared: steering hooks it (and a sweep briefly runs a
suffix of its layers), so do not run other work on the same model at the same time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tools.data import read_rows
from tools.errors import ConfigError, DataError
from tools.tasks.ab_options import (
    ANSWER_LEAD,
    REPLY,
    check_pair,
    options,
    stem,
    swap_options,
)
from tools.tasks.base import Contrast, Features, check_fields
from tools.tasks.caa_hooks import (
    Gather,
    StopForward,
    capture,
    decoder_layers,
    keep_input,
    length_batches,
    n_layers,
    pad_right,
    run_from_layer,
    steered,
)
from tools.tasks.options import SteeringOptions, check_options
from tools.tasks.pairs import (
    PairDataset,
    PairTask,
    load_arrays,
    pair_weights,
    row_text,
    save_arrays,
)
from tools.tasks.reward import PairSplit, RewardTask

if TYPE_CHECKING:
    import torch

    from tools.models import LoadedModel
    from tools.workspace import Workspace

# -- the steering vector ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CaaVector:
    """A CAA steering vector for decoder layer `layer`; steering adds c * vector there, the
    metric uses c = +/- `multiplier`. `scale`: the spread (std) of the training pairs'
    projections on the vector's direction, the unit of `SteeringTask.agreement`."""

    layer: int
    vector: np.ndarray  # [d_model]
    multiplier: float
    scale: float = 1.0

    @property
    def unit(self) -> np.ndarray:
        """The vector's direction (zeros for a zero vector)."""
        norm = float(np.linalg.norm(self.vector))
        return self.vector / norm if norm > 0 else np.zeros_like(self.vector)


@dataclass(frozen=True)
class _Prompt:
    """One question in one option order, tokenized: the tokens before the answer position
    and the matching / not-matching answer's token there."""

    prefix: tuple[int, ...]
    yes: int
    no: int


# -- the task --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringTask(PairTask):
    """`layer`: the decoder layer CAA reads and steers (None: the middle one of the bound
    model); `multiplier`: the steering strength the metric uses; `prompt_chars`: how much of
    the question stem (its end) the probe reads before each option; `batch_size`: prompts
    per forward pass; `lm`: the bound language model (`bind`)."""

    name: ClassVar[str] = "steering"
    headline: ClassVar[str] = "scr"
    fields: ClassVar[tuple[str, ...]] = ("question", "matching", "not_matching")
    generate_prompt: ClassVar[str | None] = "generate_steering.v2"
    """Asks for a question without options; `writer` then asks for each answer."""
    reply_prompt: ClassVar[str] = "answer_steering.v1"
    relevance_prompt: ClassVar[str] = "relevance_steering.v1"
    about: ClassVar[str] = (
        "behaviour steering: rows are A/B questions (question with its options, the matching "
        "answer that shows the behaviour, the not-matching one); the downstream model is a "
        "CAA steering vector at one layer, scored by SCR = Acc(+v) - Acc(-v) on held-out "
        "questions, both answer orders")

    layer: int | None = None
    multiplier: float = 1.0
    prompt_chars: int = 600
    batch_size: int = 16
    lm: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_options(self.name, SteeringOptions, {
            "layer": self.layer, "multiplier": self.multiplier,
            "prompt_chars": self.prompt_chars, "batch_size": self.batch_size})

    def bind(self, ws: Workspace) -> SteeringTask:
        """This task on the workspace's language model (loads it)."""
        return replace(self, lm=ws.model)

    # -- rows ------------------------------------------------------------------------------
    def load(self, source: str | Path, *, fields: Mapping[str, str] | None = None,
             require_labels: bool = False) -> PairDataset:
        """A/B pairs from JSONL/CSV/Parquet or a hub id: a non-empty question that lists its
        options, and two different option letters, both among them. (A pair is its own
        label: `require_labels` is accepted for the common signature and always holds.)"""
        f = check_fields(self.name, self.fields, fields)
        prompts: list[str] = []
        chosen: list[str] = []
        rejected: list[str] = []
        for where, row in read_rows(source, list(f.values())):
            q, m, n = (row_text(where, row, f[k], self.fields) for k in self.fields)
            problem = check_pair(q, m, n)
            if problem is not None:
                raise DataError(f"{where}: field '{f[problem[0]]}' {problem[1]}; fix or "
                                "remove the row")
            prompts.append(q)
            chosen.append(m.strip())
            rejected.append(n.strip())
        if not prompts:
            raise DataError(f"{source}: the dataset has no rows; add at least one question")
        return PairDataset(prompts, chosen, rejected, str(source))

    options = staticmethod(options)

    def texts(self, data: PairDataset) -> tuple[list[str], list[str]]:
        """(stem tail + matching option, stem tail + not-matching option) per pair, each
        `<end of the stem>\\nAnswer: <the option's words>`."""
        good: list[str] = []
        bad: list[str] = []
        for q, m, n in zip(data.prompts, data.chosen, data.rejected, strict=True):
            tail = stem(q)[-self.prompt_chars:] if self.prompt_chars else ""
            found = options(q)
            good.append(f"{tail}\nAnswer: {found[m[1]]}")
            bad.append(f"{tail}\nAnswer: {found[n[1]]}")
        return good, bad

    def probe_texts(self, data: PairDataset) -> Contrast:
        """Per pair, its matching text (label 1) then its not-matching text (label 0)."""
        good, bad = self.texts(data)
        texts = [t for pair in zip(good, bad, strict=True) for t in pair]
        n = len(data)
        return Contrast(texts, [1, 0] * n, [i for i in range(n) for _ in (0, 1)], data.source,
                        paired=True)

    def split(self, data: PairDataset, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """As `RewardTask.split`: about `frac` held out, questions that open alike (the first
        100 characters: one persona, one template) on one side."""
        return RewardTask().split(data, frac, seed)

    def seed_pool_dev(self, data: PairDataset, *, seed_size: int, dev_frac: float = 0.25,
                      seed: int = 0) -> PairSplit:
        """As `RewardTask.seed_pool_dev`: dev (`split`), a seed of exactly `seed_size` pairs
        by whole groups, the rest the pool."""
        return RewardTask().seed_pool_dev(data, seed_size=seed_size, dev_frac=dev_frac,
                                          seed=seed)

    # -- generated rows --------------------------------------------------------------------
    def examples(self, data: PairDataset) -> list[str]:
        """Each question without its options: what the generator is shown of real pairs
        (hosts, baseline examples), since `writer` asks for the question first."""
        return [stem(q) for q in data.prompts]

    def demos(self, data: PairDataset) -> list[dict[str, str]]:
        """Each pair as the answer prompt shows it: the question without options, the
        matching answer's words and the not-matching answer's."""
        out = []
        for q, m, n in zip(data.prompts, data.chosen, data.rejected, strict=True):
            found = options(q)
            out.append({"demo_question": stem(q), "demo_shows": found[m.strip()[1]],
                        "demo_other": found[n.strip()[1]]})
        return out

    def assemble(self, question: str, shows: str, other: str, seed: int) -> str:
        """A staged pair (`StagedWriter`) in the `format_row` layout: the question's first
        options block dropped, each answer on one line without a letter of its own, the
        behaviour behind (A) for even seeds and (B) for odd ones; "" (rejected as empty)
        when an answer is only a letter, or both say the same."""
        shows, other = (ANSWER_LEAD.sub("", " ".join(x.split())) for x in (shows, other))
        if not shows or not other or shows.casefold() == other.casefold():
            return ""
        first, second = (shows, other) if seed % 2 == 0 else (other, shows)
        matching, rest = ("(A)", "(B)") if seed % 2 == 0 else ("(B)", "(A)")
        q = f"{stem(question).strip()}\n\nChoices:\n (A) {first}\n (B) {second}"
        return self.format_row(q, matching, rest)

    def format_row(self, prompt: str, chosen: str, rejected: str) -> str:
        """A pair in the layout `parse` reads."""
        return f"Question:\n{prompt}\n\nBehaviour answer: {chosen}\nOther answer: {rejected}"

    def parse(self, reply: str) -> tuple[str, str, str] | None:
        """(question with options, matching "(X)", not matching "(Y)") from an LLM's reply
        in the `format_row` layout; None when it is malformed or not a valid pair. "Other
        answer" may be left out when the question has exactly two options."""
        from prompts import unfence

        m = REPLY.search(unfence(reply).replace("\r\n", "\n"))
        if m is None:
            return None
        question, matching, other = m.group("q").strip(), m.group("m").upper(), m.group("n")
        if other is None:
            rest = [x for x in options(question) if x != matching]
            if len(rest) != 1:
                return None
            other = rest[0]
        pair = (question, f"({matching})", f"({other.upper()})")
        return None if check_pair(*pair) else pair

    # -- the model's view ------------------------------------------------------------------
    def _lm(self) -> LoadedModel:
        if self.lm is None:
            raise ConfigError("the steering task needs a language model: bind it first "
                              "(task.bind(workspace)) so it can read and steer activations")
        return self.lm  # type: ignore[no-any-return]

    def default_layer(self) -> int:
        """`layer`, or the middle decoder layer of the bound model."""
        lm = self._lm()
        n = n_layers(lm)
        layer = n // 2 if self.layer is None else self.layer
        if not 0 <= layer < n:
            raise ConfigError(f"layer {layer} is out of range: {lm.name} has {n} layers")
        return layer

    def chat(self, question: str) -> str:
        """The question as the bound model's user turn, ready for its answer (the chat
        template with the generation prompt; "question\\n\\nAnswer: " without a template)."""
        tok = self._lm().tokenizer
        if getattr(tok, "chat_template", None):
            return str(tok.apply_chat_template([{"role": "user", "content": question}],
                                               tokenize=False, add_generation_prompt=True))
        return f"{question}\n\nAnswer: "

    def _prompts(self, data: PairDataset) -> list[_Prompt]:
        """Per pair: the question as written, then with its two options' texts swapped (the
        matching letter becomes the other one): 2n prompts."""
        variants: list[tuple[str, str, str]] = []
        for q, m, n in zip(data.prompts, data.chosen, data.rejected, strict=True):
            variants.append((q, m[1], n[1]))
            variants.append((swap_options(q, m[1], n[1]), n[1], m[1]))
        chats = [self.chat(q) for q, _, _ in variants]
        tok = self._lm().tokenizer
        yes = tok([c + "(" + m for c, (_, m, _) in zip(chats, variants, strict=True)],
                  add_special_tokens=False)["input_ids"]
        no = tok([c + "(" + n for c, (_, _, n) in zip(chats, variants, strict=True)],
                 add_special_tokens=False)["input_ids"]
        out: list[_Prompt] = []
        for y, n_ids, (q, _, _) in zip(yes, no, variants, strict=True):
            d = next((i for i, (a, b) in enumerate(zip(y, n_ids, strict=False)) if a != b), None)
            if d is None or d == 0:
                raise DataError(f"{data.source}: the two answers to {q[:60]!r} tokenize alike")
            out.append(_Prompt(tuple(y[:d]), int(y[d]), int(n_ids[d])))
        return out

    def _states(self, seqs: Sequence[Sequence[int]], layers: Sequence[int]
                ) -> dict[int, np.ndarray]:
        """Layer -> [n, d] output of that decoder layer at each sequence's last token (the
        forward stops after the last wanted layer)."""
        import torch

        lm = self._lm()
        decoder, blocks = decoder_layers(lm)
        wanted = sorted(set(layers))
        got: dict[int, list[np.ndarray]] = {layer: [] for layer in wanted}
        order: list[int] = []
        for idx in length_batches([len(s) for s in seqs], self.batch_size):
            ids = pad_right([seqs[i] for i in idx], lm)
            at = Gather(ids, [len(seqs[i]) - 1 for i in idx])
            handles = [blocks[layer].register_forward_hook(
                capture(got[layer], at, stop=layer == wanted[-1])) for layer in wanted]
            try:
                with torch.inference_mode(), contextlib.suppress(StopForward):
                    decoder(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            order += idx
        back = np.argsort(order)
        return {layer: np.concatenate(got[layer])[back] for layer in wanted}

    def _diffs(self, data: PairDataset, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """Layer -> [n, 2, d]: h(matching answer) - h(not matching) per pair, as written and
        with the options swapped."""
        if not len(data):
            raise DataError(f"{data.source}: no pairs")
        prompts = self._prompts(data)
        seqs = [p.prefix + (a,) for p in prompts for a in (p.yes, p.no)]
        states = self._states(seqs, layers)
        return {layer: (h[0::2] - h[1::2]).reshape(len(data), 2, -1)
                for layer, h in states.items()}

    def _log_odds(self, prompts: Sequence[_Prompt],
                  configs: Sequence[tuple[int, np.ndarray]], replay: bool = True
                  ) -> np.ndarray:
        """[1 + len(configs), len(prompts)]: logit(matching answer) - logit(not matching)
        at the answer position, unsteered, then with each config (layer, delta added to that
        layer's output). With `replay`, a steered pass reruns only the layers from the
        steered one on, from the unsteered pass's input to it (checked once per layer
        against the unsteered answer; a full pass where that does not reproduce it)."""
        import torch

        lm = self._lm()
        decoder, blocks = decoder_layers(lm)
        head = lm.model.get_output_embeddings()
        starts = sorted({layer for layer, _ in configs}) if replay else []
        trusted: dict[int, bool] = {}
        out = np.zeros((1 + len(configs), len(prompts)))
        for idx in length_batches([len(p.prefix) for p in prompts], self.batch_size):
            batch = [prompts[i] for i in idx]
            ids = pad_right([p.prefix for p in batch], lm)
            at = Gather(ids, [len(p.prefix) - 1 for p in batch],
                         [p.yes for p in batch], [p.no for p in batch])
            inputs: dict[int, torch.Tensor] = {}
            handles = [blocks[layer].register_forward_pre_hook(
                keep_input(inputs, layer), with_kwargs=True) for layer in starts]
            with torch.inference_mode():
                try:
                    out[0, idx] = zero = at.answer(
                        head, decoder(input_ids=ids, use_cache=False).last_hidden_state)
                finally:
                    for h in handles:
                        h.remove()
                for j, (layer, delta) in enumerate(configs, start=1):
                    if layer in inputs and layer not in trusted:
                        check = at.answer(head, run_from_layer(decoder, blocks, layer,
                                                                inputs[layer]))
                        trusted[layer] = bool(np.allclose(check, zero, rtol=1e-3, atol=1e-3))
                    with steered(lm, layer, delta):
                        if trusted.get(layer):
                            hidden = run_from_layer(decoder, blocks, layer, inputs[layer])
                        else:
                            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                        out[j, idx] = at.answer(head, hidden)
        return out

    # -- the downstream model ----------------------------------------------------------------
    def fit(self, train: PairDataset, features: Features | None = None, *, seed: int = 0,
            synthetic: Sequence[bool] | None = None,
            synthetic_share: float | None = None) -> CaaVector:
        """The CAA vector at `default_layer()` from `train`'s pairs (both option orders).
        With `synthetic_share` s, synthetic pairs together weigh s of the mean and real
        pairs 1 - s (`pair_weights`). `features` and `seed` are unused (it is a mean)."""
        return self._fit_layers(train, [self.default_layer()], synthetic, synthetic_share)[0]

    def _fit_layers(self, train: PairDataset, layers: Sequence[int],
                    synthetic: Sequence[bool] | None = None,
                    synthetic_share: float | None = None) -> list[CaaVector]:
        """One CAA vector per layer, from one pass over `train`."""
        if len(train) < 1:
            raise DataError(f"{train.source}: a steering vector needs at least 1 pair")
        w = pair_weights(len(train), synthetic, synthetic_share)
        diffs = self._diffs(train, layers)
        out: list[CaaVector] = []
        for layer in layers:
            d = diffs[layer].mean(axis=1)  # [n, d]: both orders
            v = (w[:, None] * d).sum(axis=0) / w.sum()
            model = CaaVector(layer, v, float(self.multiplier))
            proj = d @ model.unit
            spread = float(np.sqrt(np.average((proj - proj @ w / w.sum()) ** 2, weights=w)))
            out.append(replace(model, scale=spread if spread > 1e-12 else 1.0))
        return out

    def projections(self, model: CaaVector, data: PairDataset) -> np.ndarray:
        """[n] per pair, (h(matching) - h(not matching)) at the vector's layer, averaged over
        both option orders, projected on the vector's direction."""
        return np.asarray(self._diffs(data, [model.layer])[model.layer].mean(axis=1)
                          @ model.unit, dtype=np.float64)

    def agreement(self, model: CaaVector, data: PairDataset,
                  features: Features | None = None) -> np.ndarray:
        """[n] sigmoid(projection / scale): how surely each pair's matching side lies along
        the behaviour's direction (0.5: no lean; training pairs mostly well above)."""
        z = self.projections(model, data) / model.scale
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def gate(self, model: CaaVector, real: PairDataset, synthetic: PairDataset,
             features: Features | None = None, quantile: float = 0.25) -> np.ndarray:
        """A synthetic pair passes when its projection on the vector is at least the
        `quantile` of real pairs' projections (pairs the vector never trained on)."""
        if not len(synthetic):
            return np.zeros(0, dtype=bool)
        bar = np.quantile(self.projections(model, real), quantile)
        return np.asarray(self.projections(model, synthetic) >= bar)

    def metric(self, model: CaaVector, data: PairDataset,
               features: Features | None = None) -> dict[str, float]:
        """Behaviour-matching answers over both option orders, unsteered and at +/- the
        vector's multiplier; `scr` = acc_plus - acc_minus (the headline). `p_*`: the mean
        probability of the matching letter against the not-matching one."""
        if not len(data):
            raise DataError(f"{data.source}: no pairs to score")
        delta = model.multiplier * np.asarray(model.vector)
        lo = self._log_odds(self._prompts(data), [(model.layer, delta),
                                                  (model.layer, -delta)])
        return _scores(lo[0], lo[1], lo[2], len(data))

    def sweep(self, train: PairDataset, dev: PairDataset, layers: Sequence[int],
              multipliers: Sequence[float] = (1.0,)) -> list[dict[str, float]]:
        """The metric on `dev` for a vector fit on `train` at each layer, at each multiplier
        (one pass over `train`, one over `dev`); rows carry `layer`, `multiplier` and the
        vector's `norm`."""
        if not len(dev):
            raise DataError(f"{dev.source}: no pairs to score")
        n = n_layers(self._lm())
        bad = [x for x in layers if not 0 <= x < n]
        if bad or not layers:
            raise ConfigError(f"layers must be in [0, {n - 1}], got {list(layers)}")
        vectors = self._fit_layers(train, list(layers))
        grid = [(v.layer, float(m)) for v in vectors for m in multipliers]
        by_layer = {v.layer: v.vector for v in vectors}
        configs = [(layer, s * m * by_layer[layer]) for layer, m in grid for s in (1, -1)]
        lo = self._log_odds(self._prompts(dev), configs)
        norms = {v.layer: float(np.linalg.norm(v.vector)) for v in vectors}
        return [{"layer": float(layer), "multiplier": m, "norm": norms[layer],
                 **_scores(lo[0], lo[1 + 2 * k], lo[2 + 2 * k], len(dev))}
                for k, (layer, m) in enumerate(grid)]

    # -- saving the model ------------------------------------------------------------------
    def save_model(self, model: CaaVector, folder: Path) -> None:
        """The vector as `model.npz` + `model.json` (layer, multiplier, scale) in `folder`,
        each written atomically (tools/tasks/pairs.py `save_arrays`)."""
        save_arrays(Path(folder), {"vector": np.asarray(model.vector, dtype=np.float32)},
                    {"task": self.name, "kind": "caa", "layer": model.layer,
                     "multiplier": model.multiplier, "scale": model.scale})

    def load_model(self, folder: Path) -> CaaVector:
        """The vector `save_model` wrote into `folder`."""
        arrays, meta = load_arrays(Path(folder), "steering vector")
        try:
            return CaaVector(int(meta["layer"]), np.asarray(arrays["vector"], dtype=np.float64),
                             float(meta["multiplier"]), float(meta.get("scale", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{folder}: not a saved steering vector (no {exc})") from None


def _scores(zero: np.ndarray, plus: np.ndarray, minus: np.ndarray, n: int) -> dict[str, float]:
    def acc(lo: np.ndarray) -> float:
        return float(np.mean(lo > 0) + 0.5 * np.mean(lo == 0))

    def prob(lo: np.ndarray) -> float:
        return float(np.mean(1.0 / (1.0 + np.exp(-lo))))

    a_plus, a_minus = acc(plus), acc(minus)
    return {"scr": a_plus - a_minus, "acc_plus": a_plus, "acc_minus": a_minus,
            "acc_zero": acc(zero), "p_plus": prob(plus), "p_minus": prob(minus),
            "p_zero": prob(zero), "n": float(n)}
