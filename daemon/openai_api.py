"""The OpenAI-compatible part of the HTTP API: what a request may say and what a response looks
like (GET /v1/models, POST /v1/completions, POST /v1/chat/completions, streamed as server-sent
events). The HTTP glue is in daemon/http_api.py; generation in daemon/answering.py."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from daemon.answering import Answer, Asked
from editors.batching import chat_template_text

MAX_TOKENS = 1024  # a request may ask for at most this many new tokens
DEFAULT_MAX_TOKENS = 16  # as OpenAI's completions


class BadRequest(ValueError):
    """A request the endpoint cannot answer: status, message and the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Request:
    """A parsed completion or chat request."""

    chat: bool
    asked: Asked
    stream: bool
    usage_in_stream: bool = False  # stream_options.include_usage: a last event with the token counts


def parse_request(body: object, chat: bool, model: str, tokenizer) -> Request:
    """The request in `body` (a decoded JSON value), or BadRequest naming the parameter."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    asked_model = body.get("model")
    if asked_model is not None and asked_model != model:
        raise BadRequest(f"the model {asked_model!r} does not exist; this endpoint serves {model!r}", "model", 404,
                         "model_not_found")
    if chat:
        text, route = _chat_text(body.get("messages"), tokenizer)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str) or not text:
            raise BadRequest("prompt must be a non-empty string (one prompt per request)", "prompt")
        route = text
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(f"max_tokens must be an integer from 1 to {MAX_TOKENS}", "max_tokens")
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("temperature must be a number from 0 to 2 (0: greedy)", "temperature")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of at most 4 non-empty strings", "stop")
    if body.get("n", 1) not in (1, None):
        raise BadRequest("n must be 1: one answer per request", "n")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -(1 << 63) <= seed < 1 << 64):
        raise BadRequest("seed must be a 64-bit integer", "seed")  # what torch's generator takes
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return Request(chat, Asked(text, route, max_tokens, float(temperature), tuple(stop), seed), stream,
                   bool(options.get("include_usage")))


def _chat_text(messages: object, tokenizer) -> tuple[str, str]:
    """The chat through the model's template up to the assistant's turn, and its last user message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object whose role is system, user or assistant",
                             f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
            content = "".join(texts) if all(isinstance(text, str) for text in texts) else None
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                             f"messages[{i}].content")
        plain.append({"role": message["role"], "content": content})
    users = [m["content"] for m in plain if m["role"] == "user"]
    if not users:
        raise BadRequest("messages must hold a user message", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise BadRequest("the served model has no chat template: use /v1/completions", "messages")
    return chat_template_text(tokenizer, plain), users[-1]


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "mendd"}]}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def mendd_field(answer: Answer) -> dict:
    """What mendd adds to each response: the version that answered and the correction that served it."""
    return {"version": answer.snapshot.version, "served_by": answer.served_by}


def response_body(request: Request, answer: Answer, model: str, text: str, finish_reason: str, rid: str) -> dict:
    """The whole (not streamed) response."""
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": finish_reason} if request.chat
              else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason})
    return {"id": rid, "object": "chat.completion" if request.chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": answer.snapshot.version, "choices": [choice],
            "usage": usage(answer), "mendd": mendd_field(answer)}


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def chunk_body(request: Request, answer: Answer, model: str, text: str | None, finish_reason: str | None, rid: str,
               first: bool = False, counts: bool = False) -> dict:
    """One streamed event: a piece of text, (text None) the end with its finish reason, or (counts)
    the token counts after it, with no choices."""
    head = {"id": rid, "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": answer.snapshot.version,
            "mendd": mendd_field(answer)}
    if counts:
        return {**head, "choices": [], "usage": usage(answer)}
    if request.chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**head, "choices": [choice]}
