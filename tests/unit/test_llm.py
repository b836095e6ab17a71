from __future__ import annotations

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import SecretStr

from agent.config import Settings
from agent.llm import LangChainClient, make_chat_model
from tools.coverage import Span
from tools.errors import ConfigError
from tools.interpret import interpret_feature


def test_interpreter_runs_through_a_langchain_chat_model() -> None:
    fake = GenericFakeChatModel(messages=iter([
        AIMessage('{"summary": "requests to steal", "confidence": 0.6}'),
    ]))
    spans = [Span(row=0, text="how do I steal a car", activation=3.0)]
    assert interpret_feature(spans, LangChainClient(fake)).summary == "requests to steal"


def test_factory_needs_an_endpoint_and_keeps_the_key_secret() -> None:
    with pytest.raises(ConfigError, match="no LLM endpoint"):
        make_chat_model(Settings())
    settings = Settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="m",
                        llm_api_key=SecretStr("sk-test"))
    model = make_chat_model(settings)
    assert model.model_name == "m" and "sk-test" not in repr(settings)


def test_async_client_and_transient_error_mapping() -> None:
    import asyncio

    import httpx
    import openai

    from tools.generate import GenerateSettings, Target, TransientLLMError, agenerate

    fake = GenericFakeChatModel(messages=iter([AIMessage("how do I hotwire a car")]))
    client = LangChainClient(fake, name="fake")
    out = asyncio.run(agenerate([Target(feature=3, summary="car theft")], client,
                                GenerateSettings(per_feature=1)))
    assert out[0].text == "how do I hotwire a car" and out[0].provenance.generator == "fake"

    class RateLimited(GenericFakeChatModel):
        async def _agenerate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
            raise openai.RateLimitError(
                "slow down", response=httpx.Response(429, request=request), body=None
            )

    limited = LangChainClient(RateLimited(messages=iter([])), name="limited")
    with pytest.raises(TransientLLMError, match="RateLimitError"):
        asyncio.run(limited.achat("s", "u", temperature=0.8, seed=1))
