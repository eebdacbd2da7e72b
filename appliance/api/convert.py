"""Pure converters between OpenAI wire requests and internal ``GenerationRequest`` values.

Conversion happens once, at the edge; unsupported features are refused here with the parameter
named, so a client learns at once instead of getting a silently different answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from appliance.api import structured
from appliance.api.errors import APIError, unknown_parameter, unsupported_parameter
from appliance.api.protocol import ChatCompletionRequest, CompletionRequest, PromptTokensDetails, Usage, _Sampling
from appliance.generation import FinishEvent, GenerationRequest
from engines.base import ChatMessage

MAX_STOP = 16
LEGACY_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


# Fields OpenAI defines that change nothing here, accepted so existing client code works unchanged.
_ACCEPTED_EXTRAS = frozenset(
    {
        "metadata",  # tags for OpenAI's stored completions; the request log records every exchange anyway
        "store",
        "service_tier",  # one tier here
        "prompt_cache_key",  # prompt caching here is automatic (the prefix cache)
        "safety_identifier",  # like `user`
    }
)


def _no_unknown_fields(req: _Sampling) -> None:
    """A field we do not know is refused by name: silently ignoring it gives a different answer than asked."""
    extras = req.model_extra or {}
    if "audio" in extras:
        raise unsupported_parameter("audio", "Audio output is not supported: this server generates text.")
    if "modalities" in extras and extras["modalities"] != ["text"]:
        raise unsupported_parameter("modalities", "Only the 'text' modality is supported.")
    for name in extras:
        if name not in _ACCEPTED_EXTRAS and name != "modalities":
            raise unknown_parameter(name)


def _common_checks(req: _Sampling) -> None:
    _no_unknown_fields(req)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")


def lora_choices(req: _Sampling) -> tuple[tuple[str, float], ...]:
    """The ``lora`` field as (name, scale) pairs; one name twice is a mistake worth saying."""
    choices = tuple((c.name, c.scale) for c in req.lora or ())
    names = [name for name, _ in choices]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise APIError(400, f"The LoRA adapter '{name}' is listed twice.", param=f"lora.{i}.name")
    return choices


def sampling_overrides(req: _Sampling) -> dict[str, Any]:
    """Only the values the client set: the model's own defaults fill the rest."""
    values = {name: getattr(req, name) for name in _SAMPLING_FIELDS if getattr(req, name) is not None}
    if req.logit_bias:
        values["logit_bias"] = logit_bias(req.logit_bias)
    return values


MAX_LOGIT_BIAS = 300  # OpenAI's limit on the number of biased tokens


def logit_bias(given: dict[str, float]) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token id as a string -> -100..100) as (token, bias) pairs; the
    scheduler checks the ids against the model's vocabulary."""
    if len(given) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens.", param="logit_bias")
    pairs = []
    for key, bias in given.items():
        if not key.strip().isdigit():
            raise APIError(400, f"Invalid key in logit_bias: '{key}' is not a token id.", param="logit_bias")
        if not -100 <= bias <= 100:
            raise APIError(
                400, f"Invalid value in logit_bias for token {key}: {bias} (-100 to 100).", param="logit_bias"
            )
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > MAX_STOP:
        raise APIError(400, f"At most {MAX_STOP} stop sequences are allowed.", param="stop")
    return tuple(s for s in items if s)


def _message_text(index: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported_parameter(
                f"messages.{index}.content.{j}.type",
                f"Content part type '{part.type}' is not supported by this model; only 'text'.",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    """Chat's ``logprobs`` (a boolean) and ``top_logprobs`` (0-20 alternatives) as one count."""
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise APIError(400, "logprobs must be a boolean for chat completions.", param="logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true.", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _messages(req: ChatCompletionRequest) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    call_names: dict[str, str] = {}  # tool call id -> function name, for the tool results that follow
    for i, msg in enumerate(req.messages):
        extras = msg.model_extra or {}
        for name in extras:
            if name not in ("tool_calls", "tool_call_id", "function_call", "refusal"):  # refusal: echoed back
                raise unknown_parameter(f"messages.{i}.{name}")
        if msg.role == "function" or extras.get("function_call"):
            param = f"messages.{i}.role" if msg.role == "function" else f"messages.{i}.function_call"
            raise unsupported_parameter(
                param, "The deprecated function-calling messages are not supported: use tool calls."
            )
        calls: tuple[dict[str, Any], ...] = ()
        if extras.get("tool_calls"):
            if msg.role != "assistant":
                raise APIError(400, "Only assistant messages carry tool_calls.", param=f"messages.{i}.tool_calls")
            calls = structured.history_tool_calls(i, extras["tool_calls"])
            call_names.update((c["id"], c["function"]["name"]) for c in calls)
        if msg.content is None and msg.role != "assistant":
            raise APIError(400, f"A '{msg.role}' message needs content.", param=f"messages.{i}.content")
        if msg.content is None and not calls and msg.role == "assistant" and not extras.get("refusal"):
            raise APIError(400, "An assistant message needs content or tool_calls.", param=f"messages.{i}.content")
        call_id: str | None = None
        if msg.role == "tool":
            call_id = extras.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(
                    400, "A tool message needs the tool_call_id it answers.", param=f"messages.{i}.tool_call_id"
                )
        elif "tool_call_id" in extras:
            raise unknown_parameter(f"messages.{i}.tool_call_id")
        role = "system" if msg.role == "developer" else msg.role
        function = (call_names.get(call_id) or msg.name) if call_id else msg.name
        messages.append(ChatMessage(role, _message_text(i, msg.content), calls, call_id, function))
    return messages


def chat_request(req: ChatCompletionRequest) -> GenerationRequest:
    _common_checks(req)
    sampling = sampling_overrides(req)
    logprobs = _chat_logprobs(req)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    tools = structured.tool_request(req)
    grammar = structured.response_format(req.response_format)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return GenerationRequest(
        model=req.model,
        sampling=sampling,
        messages=tuple(_messages(req)),
        max_tokens=max_tokens,
        stop=stop_strings(req.stop),
        adapters=lora_choices(req),
        grammar=grammar,
        tools=tools,
    )


def completion_requests(req: CompletionRequest) -> list[GenerationRequest]:
    """One internal request per prompt (a list of prompts gives one choice each)."""
    _common_checks(req)
    if req.logprobs is not None and (isinstance(req.logprobs, bool) or not isinstance(req.logprobs, int)):
        raise APIError(400, "logprobs must be an integer from 0 to 5 for completions.", param="logprobs")
    if req.logprobs is not None and not 0 <= req.logprobs <= 5:
        raise APIError(400, "logprobs must be an integer from 0 to 5 for completions.", param="logprobs")
    if req.best_of is not None and req.best_of > 1:
        raise unsupported_parameter("best_of", "best_of > 1 is not supported.")
    if req.suffix:
        raise unsupported_parameter("suffix", "suffix (fill-in-the-middle) is not supported yet.")
    prompt = req.prompt
    if isinstance(prompt, list) and not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    sampling = sampling_overrides(req)
    if req.logprobs is not None:
        sampling["logprobs"] = req.logprobs
    common: dict[str, Any] = {
        "model": req.model,
        "sampling": sampling,
        "max_tokens": req.max_tokens if req.max_tokens is not None else LEGACY_COMPLETIONS_MAX_TOKENS,
        "stop": stop_strings(req.stop),
        "adapters": lora_choices(req),
    }
    if isinstance(prompt, str):
        return [GenerationRequest(prompt=prompt, **common)]
    ints = [p for p in prompt if isinstance(p, int)]
    strs = [p for p in prompt if isinstance(p, str)]
    lists = [p for p in prompt if isinstance(p, list)]
    if len(ints) == len(prompt):
        return [GenerationRequest(prompt_tokens=tuple(ints), **common)]
    if len(strs) == len(prompt):
        return [GenerationRequest(prompt=p, **common) for p in strs]
    if len(lists) != len(prompt) or any(not p for p in lists):
        raise APIError(400, "prompt must be a string, a list of strings, or non-empty token lists.", param="prompt")
    return [GenerationRequest(prompt_tokens=tuple(p), **common) for p in lists]


def usage(finishes: Sequence[FinishEvent], per_prompt: int = 1) -> Usage:
    """Token counts of one response: several finishes for several prompts or choices, in choice
    order; the ``per_prompt`` choices of one prompt count its tokens once, as OpenAI counts them."""
    firsts = finishes[::per_prompt]
    prompt = sum(f.prompt_tokens for f in firsts)
    completion = sum(f.completion_tokens for f in finishes)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.cached_tokens for f in firsts)),
    )
