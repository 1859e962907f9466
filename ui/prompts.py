"""Prompt sets for the rating app's rounds: prompts an operator loads (e.g. held-out questions) so that
raters need not type one each round.

Formats, by extension:
- ``.txt``: one prompt per non-empty line;
- ``.jsonl`` (or ``.json``, a list): one record per prompt with ``prompt`` (text, or chat messages),
  ``messages`` (a conversation: the prompt is everything up to its last user message — TRL's formats),
  or ``question``.

Every prompt becomes chat messages ending with a user message.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


def _as_messages(record: Any) -> Messages:
    if isinstance(record, str):
        text = record.strip()
        if not text:
            raise ValueError("an empty prompt")
        return [{"role": "user", "content": text}]
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object with prompt, messages or question")
    for key in ("prompt", "question"):
        if isinstance(record.get(key), str):
            return _as_messages(record[key])
    messages = record.get("messages", record.get("prompt"))
    if isinstance(messages, list) and messages:
        for index, message in enumerate(messages):
            if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                    and isinstance(message.get("content"), str)):
                raise ValueError(f"messages[{index}] must be {{role: system|user|assistant, content: text}}")
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ValueError("the messages have no user message")
        return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]
    raise ValueError("a record needs prompt, messages or question")


def load_prompt_set(path: str | Path) -> list[Messages]:
    """Every prompt of the file; ValueError (one line naming the file and line) for anything unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt set {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompt set {path}: cannot read it ({type(err).__name__})") from None
    if path.suffix == ".txt":
        records = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt set {path}: not valid JSON (line {err.lineno})") from None
        if not isinstance(loaded, list):
            raise ValueError(f"prompt set {path}: a .json prompt set is a list of records")
        records = [(index + 1, record) for index, record in enumerate(loaded)]
    elif path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError:
                    raise ValueError(f"prompt set {path} line {number}: not valid JSON") from None
    else:
        raise ValueError(f"prompt set {path}: use .txt (one prompt per line), .jsonl or .json")
    prompts = []
    for number, record in records:
        try:
            prompts.append(_as_messages(record))
        except ValueError as err:
            raise ValueError(f"prompt set {path} {'line' if path.suffix != '.json' else 'record'} {number}: {err}") \
                from None
    if not prompts:
        raise ValueError(f"prompt set {path}: has no prompts")
    return prompts


class PromptDeck:
    """Prompts drawn in a shuffled order, reshuffled once all were used (every prompt before any repeat)."""

    def __init__(self, prompts: list[Messages], rng: random.Random | None = None):
        if not prompts:
            raise ValueError("a prompt deck needs prompts")
        self.prompts, self.rng = prompts, rng or random.Random()
        self._order: list[int] = []

    def draw(self) -> Messages:
        if not self._order:
            self._order = list(range(len(self.prompts)))
            self.rng.shuffle(self._order)
        return [dict(m) for m in self.prompts[self._order.pop()]]
