"""Which tokens ``"pin": "system"`` keeps: a chat request's system part. Pure Python.

The system part is what the chat template renders before the first non-system
message's content: the leading system (or developer) messages, their markup, and the
next turn's header. Templates differ (some add a default system prompt when there is
none, some put the system text inside the first user turn), so it is measured rather
than parsed: render the conversation's leading system messages followed by two user
turns that differ in their first character, and take the longest token prefix those
two share with the real prompt. The count never reaches into the first non-system
message's own text, and a later turn of the same conversation counts the same tokens
(its prompt starts the same way), so a resumed session keeps its layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

SYSTEM_ROLES = ("system", "developer")
# Two user turns whose first characters differ: their renderings part where the
# content starts.
PROBES = ("A", "B")


def system_messages(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The leading messages whose role is system or developer."""
    head = []
    for message in messages:
        if message.get("role") not in SYSTEM_ROLES:
            break
        head.append(message)
    return head


def probe_conversations(messages: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The leading system messages, each followed by one probe user turn."""
    head = system_messages(messages)
    return [[*head, {"role": "user", "content": text}] for text in PROBES]


def common_prefix(*sequences: Sequence[int]) -> int:
    """Length of the longest prefix all ``sequences`` share."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def system_part_tokens(
    render: Callable[[list[Mapping[str, Any]]], Sequence[int]],
    messages: Sequence[Mapping[str, Any]],
) -> int:
    """Tokens of ``messages``' system part, where ``render(conversation)`` gives the
    prompt token ids the chat template makes of a conversation (as the request renders
    it, generation prompt included). For offline use, e.g. with a Hugging Face
    tokenizer: ``render = lambda c: tok.apply_chat_template(c, add_generation_prompt=True)``
    (a ``BatchEncoding`` result: take its ``input_ids``); pass the count as
    ``{"sink": {"pin_prompt_tokens": n}}``."""
    prompt = list(render(list(messages)))
    return common_prefix(prompt, *(list(render(c)) for c in probe_conversations(messages)))
