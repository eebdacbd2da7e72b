"""Chat templates render like transformers does; failures are typed errors."""

from __future__ import annotations

import pytest

from engines.base import ChatMessage, ChatTemplateError
from engines.chat_template import ChatTemplate


def test_fallback_is_chatml() -> None:
    tpl = ChatTemplate(None)
    assert tpl.is_fallback
    text = tpl.render([ChatMessage("system", "S"), ChatMessage("user", "U")])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_template_globals_and_special_tokens() -> None:
    src = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tpl = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    assert tpl.render([ChatMessage("user", "héllo")]) == '<s>[user]"héllo"</s>'


def test_raise_exception_becomes_chat_template_error() -> None:
    src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="must start with user"):
        ChatTemplate(src).render([ChatMessage("assistant", "x")])


def test_broken_template_is_reported() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% for %}")


def test_sandbox_blocks_attribute_escape() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([ChatMessage("user", "x")])
