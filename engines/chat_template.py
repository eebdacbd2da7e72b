"""Render a model's own Jinja chat template (``tokenizer.chat_template`` in GGUF metadata).

Models disagree on how a conversation becomes a prompt; the template shipped with the weights is
the authority. We render it the way Hugging Face ``transformers`` does (sandboxed Jinja, same
globals), so a prompt here equals the one the model was trained on. A model without a template
falls back to ChatML, the most common format among small instruct models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engines.base import ChatMessage, ChatTemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _message(m: ChatMessage) -> dict[str, Any]:
    """A message as Hugging Face templates read it: tool fields only where set."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = list(m.tool_calls)
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the model's special-token strings."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    @property
    def knows_tools(self) -> bool:
        """Whether the template renders tool definitions and tool calls itself (Hermes/Qwen,
        Llama 3.x, Mistral... templates read a ``tools`` variable)."""
        return "tools" in self.source and "tool_calls" in self.source

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] = (),
    ) -> str:
        extra: dict[str, Any] = {"tools": list(tools)} if tools else {}
        try:
            return self._template.render(
                messages=[_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc


@lru_cache(maxsize=32)
def takes_system_role(source: str) -> bool:
    """Whether a template accepts a system message (Gemma 2's raises "System role not supported"):
    where it does not, a system prompt of ours goes into the first user message instead."""
    try:
        ChatTemplate(source).render([ChatMessage("system", "s"), ChatMessage("user", "u")])
    except ChatTemplateError:
        return False
    return True
