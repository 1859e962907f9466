"""Keeping a chat inside the model's context: the oldest turns go first, the system prompt and the
newest user message always stay."""
from __future__ import annotations

Messages = list[dict[str, str]]


def drop_oldest_turn(messages: Messages) -> Messages | None:
    """The conversation without its oldest turn (a user message and the replies after it), or None when
    nothing but the system prompt and the newest user message is left."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if start >= last_user:
        return None
    end = start + 1
    while end < last_user and messages[end]["role"] != "user":
        end += 1
    return messages[:start] + messages[end:]
