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
