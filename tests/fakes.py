"""Fakes shared by the tests: scripted chat models that drive the tool-calling agents."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult


class ScriptedModel(GenericFakeChatModel):
    """Replies from a script; a step may be a function of the conversation so far (to use
    what a tool returned). bind_tools returns self; streaming yields one chunk that carries
    the tool calls (GenericFakeChatModel's own stream drops them)."""

    messages: Iterator[AIMessage | str] = iter(())
    script: list[Any] = []
    seen: list[list[BaseMessage]] = []

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        step = self.script.pop(0)
        reply = step(messages) if callable(step) else step
        msg = AIMessage(reply) if isinstance(reply, str) else reply
        return ChatResult(generations=[ChatGeneration(message=msg)])

    def _stream(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        msg = self._generate(messages).generations[0].message
        assert isinstance(msg, AIMessage)
        chunk = ChatGenerationChunk(message=AIMessageChunk(
            content=msg.content, id=msg.id, chunk_position="last",
            tool_call_chunks=[{"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"],
                               "index": i, "type": "tool_call_chunk"}
                              for i, c in enumerate(msg.tool_calls)]))
        if run_manager:
            run_manager.on_llm_new_token(str(msg.content), chunk=chunk)
        yield chunk
