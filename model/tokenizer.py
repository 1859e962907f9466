"""Sentencepiece tokenizer with the project's fixed special tokens and chat template.

Special tokens have fixed ids in every tokenizer the project trains, so checkpoints, shards and the
chat template agree without looking anything up:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)
    4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>

Chat template (one turn):  ``<|role|>`` + encode(content) + ``<|end|>``; a conversation starts with
``<s>``. ``add_generation_prompt`` appends ``<|assistant|>`` so the model writes the reply, which it
closes with ``<|end|>``. The assistant mask marks the reply tokens and their closing ``<|end|>`` —
what SFT trains on.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_SYMBOLS = (*ROLE_TOKENS.values(), END_OF_TURN)
SPECIAL_IDS = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID,
               **{sym: 4 + i for i, sym in enumerate(CHAT_SYMBOLS)}}
MODEL_FILE = "tokenizer.model"


class ChatFormatError(ValueError):
    """A chat message list that does not have the expected shape."""


@dataclass(frozen=True)
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[bool]  # True where the token is part of an assistant reply (trained on in SFT)


def train_tokenizer(
    sentences: Iterable[str],
    output_dir: str | Path,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    num_threads: int = 2,
) -> Tokenizer:
    """Train a sentencepiece model (byte fallback, fixed special ids) and save ``tokenizer.model``.

    Training is deterministic for the same sentences in the same order; callers choose (and seed)
    the sample they pass in.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer model_type must be 'bpe' or 'unigram', got {model_type!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_pieces(sentences, max_sentence_length),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=list(CHAT_SYMBOLS),
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=num_threads,
        train_extremely_large_corpus=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = output_dir / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return Tokenizer.from_bytes(buffer.getvalue())


def training_pieces(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Split documents into paragraphs (then lines) no longer than sentencepiece accepts.

    Sentencepiece silently skips over-long sentences, so whole documents must not be fed as one.
    Paragraphs keep their inner newlines so that newline pieces are learned.
    """
    for text in texts:
        for paragraph in text.split("\n\n"):
            if not paragraph.strip():
                continue
            if len(paragraph.encode("utf-8")) < max_chars:
                yield paragraph
                continue
            for line in paragraph.split("\n"):
                encoded = line.encode("utf-8")
                for start in range(0, len(encoded), max_chars // 2):
                    chunk = encoded[start:start + max_chars // 2].decode("utf-8", "ignore")
                    if chunk.strip():
                        yield chunk


class Tokenizer:
    """Thin wrapper over ``SentencePieceProcessor`` with the chat template."""

    def __init__(self, processor: spm.SentencePieceProcessor, model_bytes: bytes):
        self.sp = processor
        self.model_bytes = model_bytes
        for token, expected in SPECIAL_IDS.items():
            actual = processor.piece_to_id(token)
            if actual != expected:
                raise ValueError(f"tokenizer: special token {token} has id {actual}, expected {expected}")

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        return cls(spm.SentencePieceProcessor(model_proto=model_bytes), model_bytes)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.model`` from a file or a directory holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path}: not found")
        return cls.from_bytes(path.read_bytes())

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self.model_bytes)
        return directory / MODEL_FILE

    # Pickled by content so Ray actors and tasks can receive a tokenizer.
    def __reduce__(self):
        return (Tokenizer.from_bytes, (self.model_bytes,))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    bos_id, eos_id, pad_id, unk_id = BOS_ID, EOS_ID, PAD_ID, UNK_ID
    end_of_turn_id = SPECIAL_IDS[END_OF_TURN]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text, out_type=int)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(SPECIAL_IDS.values())
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def role_id(self, role: str) -> int:
        return SPECIAL_IDS[ROLE_TOKENS[role]]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> ChatEncoding:
        """Messages -> token ids plus a mask of the assistant's tokens."""
        ids: list[int] = [BOS_ID]
        mask: list[bool] = [False]
        for index, message in enumerate(validate_messages(messages)):
            role, content = message["role"], message["content"]
            is_reply = role == "assistant"
            body = self.encode(content) + [self.end_of_turn_id]
            ids.append(self.role_id(role))
            mask.append(False)
            ids.extend(body)
            mask.extend([is_reply] * len(body))
        if add_generation_prompt:
            ids.append(self.role_id("assistant"))
            mask.append(False)
        return ChatEncoding(ids, mask)

    def iter_pieces(self, ids: Iterable[int]) -> Iterator[str]:
        for token_id in ids:
            yield self.id_to_piece(token_id)


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    """Check the chat message shape; raise ChatFormatError naming the bad message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {role, content}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{index}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TOKENS:
            raise ChatFormatError(f"messages[{index}].role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{index}].content must be a string")
        checked.append({"role": role, "content": content})
    return checked
