"""The server's checks of a request against the model, in one place: roles and order of the messages, the
prompt's length against the context, the settings the model cannot honour. Each failure is a
:class:`~serve.errors.ServeError` naming the field."""

from __future__ import annotations

from dataclasses import replace

from chat.assistant import GenerationSettings, Prompt, VisionChat
from chat.settings import check_settings
from serve.errors import bad_request, unprocessable
from serve.jobs import text_of


def check_messages(messages: list[dict]) -> None:
    """Roles and order that every chat template accepts; the last turn is the user's question."""
    if not messages:
        raise bad_request("messages is empty; send at least one user message", "messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        if m["role"] == "system" and i != 0:
            raise bad_request("a system message may only come first", f"messages[{i}].role")
    last = messages[-1]
    if last["role"] != "user":
        raise bad_request("the last message must be the user's question", "messages")
    has_image = isinstance(last["content"], list) and any(p.get("type") == "image" for p in last["content"])
    if not text_of(last["content"]).strip() and not has_image:
        raise bad_request("the question is empty: type or say something", "messages")


def prepare_prompt(chat: VisionChat, messages: list[dict], images: list) -> Prompt:
    """The conversation prepared once (:meth:`VisionChat.prompt`), refused when the template cannot render it
    or it does not leave room in the model's context for an answer."""
    limit = chat.context_length
    if sum(len(text_of(m["content"])) for m in messages) > 32 * limit:  # clearly too long: skip tokenizing
        raise unprocessable(
            f"the conversation is far longer than the model's context of {limit} tokens",
            "messages",
            "context_length_exceeded",
        )
    try:
        prompt = chat.prompt(messages, images)
    except ValueError as err:  # TemplateError (the template's own raise_exception included) and friends
        raise bad_request(f"the chat template cannot render this conversation: {err}", "messages") from err
    if prompt.length >= limit:
        raise unprocessable(
            f"the prompt is {prompt.length} tokens; the model's context is {limit} tokens. "
            "Shorten the question or start a new conversation.",
            "messages",
            "context_length_exceeded",
        )
    return prompt


def fit_settings(chat: VisionChat, settings: GenerationSettings, prompt: Prompt) -> GenerationSettings:
    """``settings`` with ``max_new_tokens`` cut to the room the prompt leaves, and checked against the model."""
    if settings.logit_bias:
        try:
            check_settings(settings, chat.model)
        except ValueError as err:
            raise bad_request(str(err), "logit_bias") from err
    return replace(settings, max_new_tokens=min(settings.max_new_tokens, chat.context_length - prompt.length))
