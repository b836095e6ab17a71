"""LLM access, one factory: langchain-openai's ChatOpenAI for any OpenAI-compatible endpoint
(vLLM's server, Ollama, OpenAI), adapted to the `chat(system, user)` client the domain
tools expect."""

from __future__ import annotations

from typing import Any

from agent.config import Settings
from tools.errors import ConfigError


class LangChainClient:
    """`tools` chat clients (sync `chat`, async `achat`) over any langchain chat model."""

    def __init__(self, model: Any, name: str | None = None) -> None:
        self.model = model
        self.name = name or str(getattr(model, "model_name", type(model).__name__))

    async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
        import openai
        from langchain_core.messages import HumanMessage, SystemMessage

        from tools.generate import TransientLLMError

        try:
            reply = await self.model.bind(temperature=temperature, seed=seed).ainvoke(
                [SystemMessage(system), HumanMessage(user)]
            )
        except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                openai.InternalServerError) as e:
            # the SDK already retried these (llm_retries); the generator may back off more
            raise TransientLLMError(f"{type(e).__name__}: {e}") from e
        content = reply.content
        return content if isinstance(content, str) else str(content)

    def chat(self, system: str, user: str) -> str:
        from langchain_core.messages import HumanMessage, SystemMessage

        reply = self.model.invoke([SystemMessage(system), HumanMessage(user)])
        content = reply.content
        return content if isinstance(content, str) else str(content)


def make_chat_model(settings: Settings, temperature: float = 0.0) -> Any:
    """ChatOpenAI for the configured endpoint (FACSYNTH_LLM_BASE_URL / _MODEL / _API_KEY)."""
    if not settings.llm_base_url or not settings.llm_model:
        raise ConfigError(
            "no LLM endpoint configured: set llm_base_url and llm_model (facsynth.toml or "
            "FACSYNTH_LLM_BASE_URL / FACSYNTH_LLM_MODEL), e.g. a vLLM or Ollama server"
        )
    from langchain_openai import ChatOpenAI

    key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else "not-needed"
    return ChatOpenAI(
        base_url=settings.llm_base_url, model=settings.llm_model, api_key=key,
        temperature=temperature, timeout=settings.llm_timeout, max_retries=settings.llm_retries,
    )
