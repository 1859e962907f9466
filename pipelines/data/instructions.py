"""The built-in instruction set and the rule-labelled preference pairs, made from the built-in corpus.

Items are documented standard-library functions and classes: "What does `json.dumps` do?" is answered
by the first sentence of its docstring. Deterministic (sorted sources, hash-based choices) and split
by module, so validation asks about modules never seen in training.

**The rule** people would agree with, checkable by :func:`rule_checks`: a good reply uses real words
(every word occurs in the built-in corpus), ends its sentence, does not repeat itself and stays short
(3 to 40 words). Every built-in answer follows it; the rejected reply of each built-in preference pair
breaks exactly one part. The rule is learnable by a small reward model (each break leaves a visible
trace in the tokens) and partly met by an SFT model's own samples, so PPO has something to reinforce.
(A rule that the reply names the thing asked about was tried first: a 10m model never learned to copy
names, so neither SFT nor PPO could move it.)
"""
from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from pipelines.data.builtin import _module_name, parse_module, stdlib_files, stdlib_root

SPLITS = ("train", "validation")
VALIDATION_SHARE = 5  # one module in five is held out
QUESTION_FORMS = {
    "function": ("What does `{name}` do?", "Explain `{name}` in one sentence.", "What is `{name}` for?"),
    "class": ("What is `{name}`?", "Explain `{name}` in one sentence.", "What is the class `{name}` for?"),
}
MIN_WORDS, MAX_WORDS = 3, 40
WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Item:
    module: str
    name: str  # qualified: json.dumps
    kind: str  # "function" | "class"
    summary: str  # the docstring's first sentence: the answer

    @property
    def split(self) -> str:
        return split_of(self.module)

    def question(self, form: int = 0) -> str:
        forms = QUESTION_FORMS[self.kind]
        return forms[form % len(forms)].format(name=self.name)


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(module: str) -> str:
    top = module.split(".")[0]
    return "validation" if _stable(top) % VALIDATION_SHARE == 0 else "train"


def first_sentence(doc: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


@lru_cache(maxsize=1)
def documented_items() -> tuple[Item, ...]:
    """Public, documented top-level functions and classes of public stdlib modules whose summary
    follows the rule, in corpus order."""
    root = stdlib_root()
    items: list[Item] = []
    seen: set[str] = set()
    for path in stdlib_files(root):
        module = _module_name(root, path)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        tree = parse_module(path)
        if tree is None:
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            name = f"{module}.{node.name}"
            if not doc or name in seen:
                continue
            summary = first_sentence(doc)
            if rule_score(summary) == 1.0:
                seen.add(name)
                items.append(Item(module, name, "class" if isinstance(node, ast.ClassDef) else "function", summary))
    return tuple(items)


def items_of(split: str) -> list[Item]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [item for item in documented_items() if item.split == split]


def builtin_conversations(split: str, forms_per_item: int = 2) -> list[dict]:
    """TRL-format SFT rows ``{"messages": [user, assistant]}``: a few phrasings per item."""
    rows = []
    for item in items_of(split):
        first = _stable(item.name) % len(QUESTION_FORMS[item.kind])
        for k in range(forms_per_item):
            rows.append({"messages": [{"role": "user", "content": item.question(first + k)},
                                      {"role": "assistant", "content": item.summary}]})
    return rows


def held_out_questions(n: int) -> list[str]:
    """The first ``n`` validation questions (modules never seen in training), one phrasing each."""
    return [item.question(_stable(item.name)) for item in items_of("validation")[:n]]


def builtin_prompts(split: str) -> list[dict]:
    """PPO prompts ``{"prompt": [user message]}``: one question per item of the split (validation ones
    ask about modules the SFT model never saw)."""
    return [{"prompt": [{"role": "user", "content": item.question(_stable(item.name))}]} for item in items_of(split)]


# ---- the rule -------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def corpus_words() -> frozenset[str]:
    """Every word (letters only, lower case) of the built-in corpus."""
    from pipelines.data.builtin import iter_builtin_documents

    words: set[str] = set()
    for document in iter_builtin_documents():
        words.update(w.lower() for w in WORD.findall(document["text"]))
    return frozenset(words)


def _shape_checks(reply: str) -> dict[str, bool]:
    words = WORD.findall(reply)
    lowered = [w.lower() for w in words]
    trigrams = [tuple(lowered[i:i + 3]) for i in range(len(lowered) - 2)]
    return {"ends_sentence": bool(re.search(r"[.!?][\"')\]`]*$", reply.strip())),
            "no_repetition": len(trigrams) == len(set(trigrams)),
            "short": MIN_WORDS <= len(words) <= MAX_WORDS}


def rule_checks(reply: str) -> dict[str, bool]:
    """Each part of the rule: real_words, ends_sentence, no_repetition, short."""
    vocabulary = corpus_words()
    words = [w.lower() for w in WORD.findall(reply)]
    return {"real_words": bool(words) and all(w in vocabulary for w in words), **_shape_checks(reply)}


def rule_score(reply: str, prompt: object = None) -> float:
    """1.0 when the reply follows every part of the rule, else 0.0 (``prompt`` is accepted for the
    reward-function signature; the rule does not depend on it)."""
    return 1.0 if all(rule_checks(reply).values()) else 0.0


def rule_reward(prompts: Sequence[object], replies: Sequence[str]) -> list[float]:
    """The rule as a reward function (``reward.function=pipelines.data.instructions:rule_reward``)."""
    return [rule_score(reply) for reply in replies]


def rule_fraction_reward(prompts: Sequence[object], replies: Sequence[str]) -> list[float]:
    """A dense version of the rule: the share of its four parts each reply meets (0, 0.25, ..., 1)."""
    return [sum(rule_checks(reply).values()) / 4 for reply in replies]


# ---- rule-labelled preference pairs ---------------------------------------------------------------
def _gibberish(word: str) -> str:
    return word[::-1] + "q" if len(word) > 2 else word + "zq"


def broken_reply(item: Item, items: Sequence[Item], index: int) -> tuple[str, str]:
    """(the rule part it breaks, a reply that breaks it) — one kind per pair, cycled by index."""
    words = item.summary.split()
    kind = ("ends_sentence", "no_repetition", "real_words", "short")[index % 4]
    if kind == "ends_sentence":
        cut = max(2, (len(words) * 2) // 3)
        reply = " ".join(words[:cut]).rstrip(".!?,;:") + (" and" if cut >= len(words) else "")
    elif kind == "no_repetition":
        phrase = " ".join(words[: min(3, len(words))]).rstrip(".!?")
        reply = f"{phrase} {phrase} {phrase} " + item.summary
    elif kind == "real_words":
        reply = " ".join(WORD.sub(lambda m: _gibberish(m.group()), w) if i % 2 == 0 else w
                         for i, w in enumerate(words))
        if not reply.rstrip().endswith((".", "!", "?")):
            reply += "."
    else:
        parts, k = [item.summary], 1
        while len(WORD.findall(" ".join(parts))) <= MAX_WORDS:
            parts.append(items[(index + k) % len(items)].summary)
            k += 1
        # Just over the limit (so the pair still fits a small model's context), ending its sentence.
        kept: list[str] = []
        for token in " ".join(parts).split():
            kept.append(token)
            if len(WORD.findall(" ".join(kept))) > MAX_WORDS + 2:
                break
        reply = " ".join(kept).rstrip(".,;:!?") + "."
    return kind, reply


def builtin_preference_pairs(split: str) -> list[dict]:
    """TRL conversational preference rows: the rule-following answer is chosen, a reply breaking one
    part of the rule is rejected. ``meta.broken`` names the part."""
    items = items_of(split)
    rows = []
    for index, item in enumerate(items):
        kind, rejected = broken_reply(item, items, index)
        prompt = [{"role": "user", "content": item.question(_stable(item.name))}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": item.summary}],
                     "rejected": [{"role": "assistant", "content": rejected}], "meta": {"broken": kind}})
    return rows
