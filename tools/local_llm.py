"""In-process generation with transformers over an already loaded model (no server).

`LocalChat` serves the interpreter (`chat`), the targeted generator (`achat`) and completion
baselines (`acomplete`) from the model the probe already holds. Generation is batched:
prompts are left-padded into one `generate` call; concurrent `achat`/`acomplete` calls (as
`agenerate` makes them) are collected for a few milliseconds and run as one batch in a worker
thread. Sampling is seeded per request: each row draws its tokens from its own
`torch.Generator` seeded with the request's seed (`_RowSampler`), so a reply depends only on
its prompt, temperature and seed, not on which other requests share its batch: a sample
regenerated alone after a kill (resume) equals the one first generated in a batch (up to
floating-point differences between padded shapes, which could flip a draw that lands
exactly on a probability boundary). Batching is kept; the cost is one small CPU
`multinomial` per row and step (the probabilities are copied to the CPU), negligible
beside the forward pass. Temperature 0 is greedy.

Steering adds a feature's decoder direction of an SAE to the residual stream at the SAE's
hook point (every position, prompt and generated) while generating. Two kinds:
- a fixed `steer=(sae, feature, scale)` for the whole client adds `scale * W_dec[feature]`
  (absolute units: the decoder row as stored);
- per request, `achat(..., steer=(feature, alpha))` on a client built with `sae=` adds
  `alpha * rho * W_dec[feature] / |W_dec[feature]|`, where rho is the median residual norm at
  the hook over a fixed reference prompt (measured once). The unit is the residual's own
  size, so alpha means the same for any SAE (decoder rows are unit-norm in some, not in
  others) and any layer (residual norms grow with depth): alpha = 0.5 pushes each position
  half a typical residual length along the feature. (smollm2-135m, layer 8: rho ~130; over
  12 replies for 3 task features, alpha 0.25 raised how often the target fired from 25% to
  58% with fluent text, 0.5 began to repeat words, 1.0 gave word salad.) Requests with
  different steering share a batch: each row gets its own direction (zero for an unsteered
  row, which then replies as it would alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tools.errors import ConfigError
from tools.models import LoadedModel
from tools.sae import LoadedSAE, check_fits

Steer = tuple[LoadedSAE, int, float]
"""(SAE, feature, scale): add scale * W_dec[feature] at the SAE's hook point."""
RowSteer = tuple[int, float]
"""(feature, alpha) of one request: alpha residual norms along the feature's direction."""
REFERENCE = ("You write realistic messages that people send to chatbots.",
             "Write one message about cooking dinner for friends on a rainy evening.")
"""The fixed prompt whose residual norm at the hook sets the unit of per-request steering."""


class _RowSampler:
    """Samples each row's next token with that row's own seeded generator.

    Runs as the last logits processor of a greedy `generate` (after min-new-tokens, etc.):
    it applies temperature, top-k and top-p, draws one token per row from a CPU
    `torch.Generator` seeded with the row's seed, and returns scores that are -inf except
    at the drawn token, which greedy decoding then picks. A row's draws thus depend only on
    its own scores and seed; the global torch RNG is neither used nor advanced. (A plain
    callable: `generate` takes any `(input_ids, scores) -> scores` as a logits processor.)
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_k: int, top_p: float):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [
            torch.Generator().manual_seed(s & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds
        ]
        self.temperature = temperature
        self.warpers: list[Any] = []
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows but {len(self.generators)} seeds")
        logits = scores.float() / self.temperature
        for warp in self.warpers:
            logits = warp(input_ids, logits)
        probs = torch.softmax(logits, dim=-1).cpu()
        picks = torch.cat([
            torch.multinomial(probs[row], 1, generator=gen)
            for row, gen in enumerate(self.generators)
        ]).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks), device=scores.device), picks] = 0.0
        return out


@dataclass(eq=False)
class _Request:
    kind: Literal["chat", "complete"]
    prompt: tuple[str, str] | str
    temperature: float
    seed: int
    max_new_tokens: int
    future: asyncio.Future[str]
    steer: RowSteer | None = None

    @property
    def key(self) -> tuple[str, float, int]:
        return self.kind, self.temperature, self.max_new_tokens


@dataclass
class _Queue:
    loop: asyncio.AbstractEventLoop
    pending: list[_Request] = field(default_factory=list)
    worker: asyncio.Task[None] | None = None


class LocalChat:
    """Chat and completion clients over a `LoadedModel`; see the module doc."""

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_new_tokens: int = 96,
        batch_size: int = 16,
        batch_window_s: float = 0.005,
        steer: Steer | None = None,
        sae: LoadedSAE | Callable[[], LoadedSAE] | None = None,
        name: str | None = None,
    ) -> None:
        """`steer`: a fixed steering for every reply; `sae` (or a function loading it on the
        first steered request): the SAE per-request steering uses (default: steer's)."""
        if lm.tokenizer.chat_template is None:
            raise ConfigError(
                f"model {lm.name!r} has no chat template: LocalChat needs an instruct/chat "
                "model (e.g. smollm2-135m), or use generator=endpoint"
            )
        self.lm = lm
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.batch_window_s = batch_window_s
        self.steer = steer
        if steer is not None:
            sae, feature, _ = steer
            check_fits(sae, lm.model)
            if not 0 <= feature < sae.d_sae:
                raise ConfigError(
                    f"steer feature {feature} is outside the SAE's 0..{sae.d_sae - 1}"
                )
        suffix = f"+steer{steer[1]}x{steer[2]:g}" if steer else ""
        self.name = name or f"local:{lm.name}{suffix}"
        self._lock = threading.Lock()  # one generate at a time (model + hooks are shared)
        self._queue: _Queue | None = None
        self._sae: LoadedSAE | Callable[[], LoadedSAE] | None = (
            sae if sae is not None else steer[0] if steer is not None else None)
        self._rho: float | None = None

    @property
    def can_steer(self) -> bool:
        """Per-request steering (`achat(..., steer=...)`) works: the client has an SAE."""
        return self._sae is not None

    def steering_sae(self) -> LoadedSAE:
        """The SAE per-request steering uses (loaded and checked on first use)."""
        if self._sae is None:
            raise ConfigError(f"{self.name}: per-request steering needs an SAE (LocalChat(..., "
                              "sae=...)); this client has none")
        if not isinstance(self._sae, LoadedSAE):
            self._sae = self._sae()
            check_fits(self._sae, self.lm.model)
        return self._sae

    def check_steer(self, steer: RowSteer) -> None:
        feature, alpha = steer
        sae = self.steering_sae()
        if not 0 <= feature < sae.d_sae:
            raise ConfigError(f"steer feature {feature} is outside the SAE's 0..{sae.d_sae - 1}")
        if alpha < 0:
            raise ConfigError(f"steer scale {alpha} is negative")

    # -- prompts -----------------------------------------------------------------------

    def chat_prompt(self, system: str, user: str) -> str:
        """The chat template's text for a system + user turn, ready for the reply."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return str(self.lm.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        ))

    def _ids(self, prompt: str) -> list[int]:
        tok = self.lm.tokenizer
        # chat-template text carries its own special tokens; add BOS only when it lacks one
        add = bool(tok.bos_token) and not prompt.startswith(tok.bos_token)
        return list(tok(prompt, add_special_tokens=add)["input_ids"])

    # -- batched generation ------------------------------------------------------------

    def complete_batch(
        self, prompts: Sequence[str], *, temperature: float = 0.0, seed: int = 0,
        seeds: Sequence[int] | None = None,
        max_new_tokens: int | None = None, min_new_tokens: int | None = None,
        steers: Sequence[RowSteer | None] | None = None,
    ) -> list[str]:
        """Raw continuations of `prompts` (no chat template), one padded generate call.

        Sampling seeds each row on its own: row i uses `seeds[i]`, or `seed + i` when
        `seeds` is not given; a row's reply does not depend on the other rows. `steers[i]`
        steers row i (see the module doc; None: not steered)."""
        if not prompts:
            return []
        if seeds is None:
            seeds = [seed + i for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if steers is not None and len(steers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(steers)} steers")
        tok, model = self.lm.tokenizer, self.lm.model
        batch = tok.pad({"input_ids": [self._ids(p) for p in prompts]},
                        padding_side="left", return_tensors="pt")
        n_new = max_new_tokens or self.max_new_tokens
        kwargs: dict[str, Any] = {"max_new_tokens": n_new, "pad_token_id": tok.pad_token_id}
        if min_new_tokens:
            kwargs["min_new_tokens"] = min_new_tokens
        if model.generation_config.eos_token_id is None and tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        # greedy decoding; with temperature > 0 the per-row sampler makes the choice
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            config = model.generation_config  # the sampling defaults generate would use
            kwargs["logits_processor"] = [_RowSampler(
                seeds, temperature,
                top_k=50 if config.top_k is None else int(config.top_k),
                top_p=1.0 if config.top_p is None else float(config.top_p),
            )]
        input_ids = batch["input_ids"].to(self.lm.device)
        with self._lock, self._steering(steers or ()), torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=batch["attention_mask"].to(self.lm.device),
                **kwargs,
            )
        return list(tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True))

    def generate_batch(
        self, messages: Sequence[tuple[str, str]], *, temperature: float = 0.0, seed: int = 0,
        seeds: Sequence[int] | None = None,
        max_new_tokens: int | None = None, min_new_tokens: int | None = None,
        steers: Sequence[RowSteer | None] | None = None,
    ) -> list[str]:
        """Replies to (system, user) pairs, one padded generate call (seeds and steers as in
        `complete_batch`)."""
        replies = self.complete_batch(
            [self.chat_prompt(s, u) for s, u in messages], temperature=temperature, seed=seed,
            seeds=seeds, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            steers=steers,
        )
        return [r.strip() for r in replies]

    def _residual_norm(self, sae: LoadedSAE) -> float:
        """rho: the median residual norm at the SAE's hook over the REFERENCE prompt (the
        first position left out: attention-sink tokens carry outsized norms). Call with the
        lock held and no steering hook in place."""
        if self._rho is None:
            module = self.lm.model.get_submodule(sae.hook.module)
            seen: list[torch.Tensor] = []

            def grab(hidden: Any) -> None:
                seen.append((hidden[0] if isinstance(hidden, tuple) else hidden).detach())

            if sae.hook.side == "output":
                handle = module.register_forward_hook(lambda _m, _args, out: grab(out))
            else:
                handle = module.register_forward_pre_hook(lambda _m, args: grab(args))
            ids = torch.tensor([self._ids(self.chat_prompt(*REFERENCE))], device=self.lm.device)
            try:
                with torch.inference_mode():
                    self.lm.model(input_ids=ids)
            finally:
                handle.remove()
            self._rho = float(seen[0][0, 1:].float().norm(dim=-1).median())
        return self._rho

    def _row_directions(self, steers: Sequence[RowSteer | None]) -> torch.Tensor | None:
        """[rows, 1, d_model]: each row's alpha * rho * unit W_dec[feature] (zeros for an
        unsteered row); None when no row is steered."""
        if not any(steers):
            return None
        sae = self.steering_sae()
        rho = self._residual_norm(sae)
        w_dec = sae.sae.W_dec.detach()
        rows = torch.zeros(len(steers), w_dec.shape[1], dtype=torch.float32,
                           device=w_dec.device)
        for i, st in enumerate(steers):
            if st is not None:
                feature, alpha = st
                row = w_dec[feature].float()
                rows[i] = alpha * rho * row / row.norm().clamp_min(1e-12)
        return rows[:, None, :]

    @contextlib.contextmanager
    def _steering(self, steers: Sequence[RowSteer | None] = ()) -> Iterator[None]:
        rows = self._row_directions(steers)
        if self.steer is None and rows is None:
            yield
            return
        sae = self.steer[0] if self.steer is not None else self.steering_sae()
        module = self.lm.model.get_submodule(sae.hook.module)
        param = next(self.lm.model.parameters())
        direction = torch.zeros((), dtype=param.dtype, device=param.device)
        if self.steer is not None:
            _, feature, scale = self.steer
            direction = (scale * sae.sae.W_dec[feature].detach()).to(param.device, param.dtype)
        if rows is not None:  # [rows, 1, d] broadcasts over [rows, positions, d]
            direction = direction + rows.to(param.device, param.dtype)

        def add(hidden: Any) -> Any:
            if isinstance(hidden, tuple):
                return (hidden[0] + direction, *hidden[1:])
            return hidden + direction

        if sae.hook.side == "output":
            handle = module.register_forward_hook(lambda _m, _args, out: add(out))
        else:
            handle = module.register_forward_pre_hook(lambda _m, args: add(args))
        try:
            yield
        finally:
            handle.remove()

    # -- the client protocols --------------------------------------------------------

    def chat(self, system: str, user: str) -> str:
        """Greedy reply (the interpreter's `ChatClient`)."""
        return self.generate_batch([(system, user)])[0]

    async def achat(self, system: str, user: str, *, temperature: float, seed: int,
                    steer: RowSteer | None = None) -> str:
        """One reply; concurrent calls are batched (the generator's `AsyncChatClient`).
        `steer=(feature, alpha)` steers this reply (see the module doc; needs `sae`)."""
        if steer is not None:
            self.check_steer(steer)
        return await self._submit("chat", (system, user), temperature, seed, self.max_new_tokens,
                                  steer)

    def with_max_tokens(self, n: int) -> _LongerChat:
        """This client, its chat replies up to `n` tokens (batched with its other requests)."""
        return _LongerChat(self, n)

    async def acomplete(
        self, prompt: str, *, temperature: float, seed: int, max_tokens: int | None = None
    ) -> str:
        """Raw continuation of `prompt` (no chat template); concurrent calls are batched."""
        return await self._submit(
            "complete", prompt, temperature, seed, max_tokens or self.max_new_tokens
        )

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> LocalChat:
        """No constrained decoding in-process: the same client (callers validate and retry)."""
        return self

    async def _submit(
        self, kind: Literal["chat", "complete"], prompt: tuple[str, str] | str,
        temperature: float, seed: int, max_new_tokens: int, steer: RowSteer | None = None,
    ) -> str:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._queue.loop is not loop:
            self._queue = _Queue(loop)
        queue = self._queue
        request = _Request(kind, prompt, temperature, seed, max_new_tokens, loop.create_future(),
                           steer)
        queue.pending.append(request)
        if queue.worker is None or queue.worker.done():
            queue.worker = loop.create_task(self._drain(queue))
        return await request.future

    async def _drain(self, queue: _Queue) -> None:
        while queue.pending:
            await asyncio.sleep(self.batch_window_s)  # let concurrent callers join the batch
            key = queue.pending[0].key
            batch = [r for r in queue.pending if r.key == key][: self.batch_size]
            queue.pending = [r for r in queue.pending if r not in batch]
            try:
                texts = await asyncio.to_thread(self._run, batch)
            except Exception as e:  # every caller in the batch sees the failure
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            for r, text in zip(batch, texts, strict=True):
                if not r.future.done():
                    r.future.set_result(text)

    def _run(self, batch: Sequence[_Request]) -> list[str]:
        first = batch[0]
        if first.kind == "chat":
            pairs = [r.prompt for r in batch if isinstance(r.prompt, tuple)]
            return self.generate_batch(pairs, temperature=first.temperature,
                                       seeds=[r.seed for r in batch],
                                       max_new_tokens=first.max_new_tokens,
                                       steers=[r.steer for r in batch])
        texts = [r.prompt for r in batch if isinstance(r.prompt, str)]
        return self.complete_batch(texts, temperature=first.temperature,
                                   seeds=[r.seed for r in batch],
                                   max_new_tokens=first.max_new_tokens)


class _LongerChat:
    """`LocalChat.with_max_tokens`: the same model and queue, longer chat replies."""

    def __init__(self, chat: LocalChat, n: int) -> None:
        self.chat, self.n, self.name = chat, n, chat.name

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        return await self.chat._submit("chat", (system, user), temperature, seed, self.n)
