"""Quality filters with the published thresholds as defaults.

- Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A;
  thresholds as in datatrove's GopherQualityFilter / GopherRepetitionFilter).
- C4 line rules (Raffel et al. 2020, as in datatrove's C4QualityFilter). These edit the text (drop
  lines) as well as drop documents. The bad-words list is not applied: no list ships with the
  project's dependencies.
- FineWeb's line rules (Penedo et al. 2024, datatrove's FineWebQualityFilter).
- Language identification with py3langid (its model ships inside the package).

Every filter returns ``None`` to keep a document or a reason ``"<filter>:<rule>"`` to drop it, so
the manifest can count drops per filter and rule.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from py3langid.langid import MODEL_FILE, LanguageIdentifier, visit_counts
from pydantic import Field

from pipelines.config import StrictModel

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "”", "’", "…")
_PARAGRAPHS = re.compile(r"\n{2,}")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                     "use of cookies", "use cookies")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_LONG_TOKEN_CACHE: dict[int, re.Pattern] = {}


class Document:
    """Views of one text that several filters need, each computed once, on first use."""

    __slots__ = ("text", "_words", "_lines", "_lower", "_counts")

    def __init__(self, text: str):
        self.text = text
        self._words: list[str] | None = None
        self._lines: list[str] | None = None
        self._lower: str | None = None
        self._counts: dict[str, int] | None = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = self.text.split()
        return self._words

    @property
    def lines(self) -> list[str]:
        """Non-empty lines, stripped."""
        if self._lines is None:
            self._lines = [line for line in map(str.strip, self.text.split("\n")) if line]
        return self._lines

    @property
    def word_counts(self) -> dict[str, int]:
        """Each distinct word with its count, in order of first appearance (word-level rules look at
        each distinct word once instead of every occurrence)."""
        if self._counts is None:
            self._counts = Counter(self.words)
        return self._counts

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower


def _document(text: str, doc: Document | None) -> Document:
    return doc if doc is not None and doc.text is text else Document(text)


# ---------------------------------------------------------------- configs (published defaults)

class LanguageConfig(StrictModel):
    enabled: bool = True
    languages: list[str] = Field(["en"], description="ISO 639-1 codes to keep")
    min_score: float = Field(0.65, ge=0, le=1, description="minimum normalised probability (FineWeb: 0.65)")


class GopherQualityConfig(StrictModel):
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: list[str] = ["the", "be", "to", "of", "and", "that", "have", "with"]


class GopherRepetitionConfig(StrictModel):
    enabled: bool = True
    max_dup_line_frac: float = 0.3
    max_dup_para_frac: float = 0.3
    max_dup_line_char_frac: float = 0.2
    max_dup_para_char_frac: float = 0.2
    top_ngram_max_frac: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    dup_ngram_max_frac: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    ignore_symbol_lines: bool = Field(False, description="lines without a letter or digit (a lone '{' or '},' "
                                                         "of example code) never count as repeated lines")


class C4Config(StrictModel):
    enabled: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = Field(True, description="drop lines not ending in terminal punctuation")
    min_words_per_line: int = Field(3, description="drop lines with fewer words")
    max_word_length: int = Field(1000, description="drop lines with a longer word")
    min_num_sentences: int = Field(5, description="drop documents with fewer sentences left")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = Field(True, description="drop lines mentioning javascript")
    filter_curly_bracket: bool = Field(True, description="drop documents containing '{' (code)")
    filter_policy: bool = Field(True, description="drop cookie/privacy/terms lines")


class FineWebConfig(StrictModel):
    enabled: bool = True
    line_punct_thr: float = Field(0.12, description="drop if at most this fraction of lines end in . ' \" ! ?")
    line_punct_exclude_zero: bool = Field(False, description="keep documents where no line ends in punctuation")
    short_line_thr: float = Field(0.67, description="drop if at least this fraction of lines are short")
    short_line_length: int = 30
    char_duplicates_ratio: float = Field(0.01, description="drop if at least this share of the characters "
                                                           "(newlines excluded) are in repeated lines")
    new_line_ratio: float = Field(0.3, description="drop if newlines per word exceed this (list-like pages)")


class FiltersConfig(StrictModel):
    language: LanguageConfig = LanguageConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()
    preset: Literal["auto", "web", "books", "code_docs", "published"] = Field(
        "auto", description="web (alias: published): the papers' C4/FineWeb/Gopher rules and thresholds; "
                            "books: prose, plays and verse (no web line rules, Gopher with book limits); "
                            "code_docs: relaxed for code documentation; auto: chosen per document from its "
                            "format and shape. An input given as PATH:preset uses that preset")


PRESETS = ("web", "books", "code_docs")  # what a document is judged by ("published" is "web")

PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    # Books (Gutenberg-style prose, plays, verse): the web line rules are off (verse lines end without
    # punctuation, are short and repeat; speaker labels repeat as lines; one "{" is not code), whole
    # works are longer than web pages, refrains repeat. Gopher's word-level quality rules, the
    # paragraph and n-gram repetition rules (with looser limits) and language identification still
    # stand between the corpus and spam, gibberish and boilerplate.
    "books": {
        "c4": {"filter_curly_bracket": False, "filter_no_terminal_punct": False, "min_words_per_line": 0,
               "min_num_sentences": 1, "filter_javascript": False, "filter_policy": False},
        "fineweb": {"enabled": False},
        "gopher_quality": {"max_doc_words": 2_000_000, "max_ellipsis_lines_ratio": 0.5,
                           "max_bullet_lines_ratio": 0.9},
        "gopher_repetition": {"max_dup_line_frac": 1.0, "max_dup_line_char_frac": 1.0,
                              "max_dup_para_frac": 0.5, "max_dup_para_char_frac": 0.4,
                              "top_ngram_max_frac": {2: 0.2, 3: 0.18, 4: 0.16},
                              "dup_ngram_max_frac": {5: 0.3, 6: 0.28, 7: 0.26, 8: 0.24, 9: 0.22, 10: 0.2}},
    },
    # The built-in corpus is Python documentation: prose mixed with code, signatures and examples.
    # The web-text rules below would throw away most of it for being code-like (curly brackets,
    # lines without final punctuation, repeated phrases such as "Return the ...") although it is
    # clean, useful text. Everything not listed keeps its published value.
    "code_docs": {
        "c4": {"filter_curly_bracket": False, "filter_no_terminal_punct": False,
               "min_words_per_line": 0, "min_num_sentences": 1},
        "fineweb": {"char_duplicates_ratio": 0.1, "line_punct_thr": 0.0, "new_line_ratio": 0.5},
        "gopher_repetition": {"max_dup_line_char_frac": 0.3, "max_dup_para_char_frac": 0.3,
                              "ignore_symbol_lines": True,
                              "dup_ngram_max_frac": {5: 0.3, 6: 0.28, 7: 0.26, 8: 0.24, 9: 0.22, 10: 0.2}},
    },
}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "dup_ngram_max_frac" \
                and key != "top_ngram_max_frac":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def effective_filters(cfg: FiltersConfig, preset: str) -> FiltersConfig:
    """The preset's values under every field the user set explicitly (explicit settings win)."""
    overrides = PRESET_OVERRIDES.get("web" if preset == "published" else preset, {})
    if not overrides:
        return cfg
    explicit = cfg.model_dump(exclude_unset=True)
    return FiltersConfig.model_validate(_deep_merge(overrides, explicit))


# ---------------------------------------------------------------- language

class _WindowedIdentifier(LanguageIdentifier):
    """py3langid's identifier with its byte-by-byte DFA walk replaced by a numpy computation.

    The model's DFA is the Aho-Corasick automaton of its feature trie (checked for py3langid 0.4's
    model: every one of its 26.8M transitions goes to the longest suffix of the input that is a trie
    node). So the state after byte i depends only on the last ``depth`` bytes (the deepest node),
    and walking every position's window from the root, all positions at once, gives the same states
    as the sequential walk. Feature counts are then ordered by first occurrence, as the library's
    Counter orders them, so scores are bit-identical. Everything else (encoding, NFC, scoring,
    normalisation) is the library's own code.
    """

    __slots__ = ("_next", "_row_offsets", "_feature", "_depth")

    def __init__(self, *args: Any, depth: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # A view of the library's transition table (no copy: it has ~10M entries), or the memory map.
        self._next = (self.tk_nextmove if isinstance(self.tk_nextmove, np.ndarray)
                      else np.frombuffer(self.tk_nextmove, dtype=np.dtype(self.tk_nextmove.typecode)))
        self._row_offsets = np.asarray(self._rowbase, dtype=np.int64)
        self._feature = np.asarray(self.tk_output, dtype=np.int64)
        self._depth = self._trie_depth() if depth is None else depth

    def _trie_depth(self) -> int:
        """Longest shortest path from the root (breadth-first over all 256 bytes per state)."""
        seen = np.zeros(len(self._row_offsets), dtype=bool)
        seen[0] = True
        frontier, depth, letters = np.array([0]), 0, np.arange(256)
        while True:
            found = []
            for start in range(0, len(frontier), 4096):  # bounds the [states, 256] temporary
                successors = self._next[self._row_offsets[frontier[start:start + 4096], None] + letters]
                found.append(successors[~seen[successors]])
                seen[found[-1]] = True
            frontier = np.unique(np.concatenate(found))
            if len(frontier) == 0:
                return depth
            depth += 1

    def window_counts(self, data: bytes) -> dict[int, int] | None:
        """Feature -> count over the DFA walk of ``data``, keys in first-visit order; None if none."""
        letters = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        states = np.zeros(len(letters), dtype=np.int64)
        for back in range(min(self._depth, len(letters)) - 1, -1, -1):
            # every position i >= back takes byte i - back; positions before it have not started
            states[back:] = self._next[self._row_offsets[states[back:]] + letters[:len(letters) - back]]
        features = self._feature[states]
        features = features[features >= 0]
        if len(features) == 0:
            return None
        values, first, counts = np.unique(features, return_index=True, return_counts=True)
        order = np.argsort(first)
        return dict(zip(values[order].tolist(), counts[order].tolist()))

    def _raw_score(self, text: bytes) -> np.ndarray:
        visits = self.window_counts(text)
        if visits:
            return self._sparse_score(visits, self.nb_ptc)
        return super()._raw_score(text)  # no features: the library's own fallback


_SELF_CHECK = ("Grüße aus Köln — naïve café. 東京は晴れ。 Привет, мир! ... \n\t 12345 "
               "the quick brown fox jumps over the lazy dog") * 3


def _model_cache_path() -> Path:
    """Where the decompressed language model is kept between processes: ``GROUNDUP_CACHE_DIR`` or a
    folder in the temporary directory; one folder of .npy arrays per py3langid model file (size and
    time in the name)."""
    from py3langid.langid import MODEL_DIR

    source = Path(MODEL_DIR) / MODEL_FILE
    info = source.stat()
    base = Path(os.environ.get("GROUNDUP_CACHE_DIR") or Path(tempfile.gettempdir()) / "groundup-cache")
    return base / f"py3langid-{info.st_size}-{int(info.st_mtime)}"


_MODEL_ARRAYS = ("ptc", "pc", "classes", "nextmove", "nextmove_row", "out_feat", "depth")


def _write_model_cache(cache: Path) -> None:
    """py3langid's own arrays (``modelio.load_model``, as ``from_model_file`` builds them) and the
    automaton's depth, one .npy file each, written to a temporary folder renamed into place."""
    import shutil

    from py3langid import modelio
    from py3langid.langid import MODEL_DIR

    ptc, pc, classes, nextmove, row, output = modelio.load_model(Path(MODEL_DIR) / MODEL_FILE)
    depth = _WindowedIdentifier(np.asarray(ptc), pc, classes, nextmove, output, norm_probs=True, tk_row=row)._depth
    arrays = {"ptc": np.asarray(ptc), "pc": np.asarray(pc), "classes": np.array(classes),
              "nextmove": np.frombuffer(nextmove, dtype=np.dtype(nextmove.typecode)),
              "nextmove_row": np.frombuffer(row, dtype=np.dtype(row.typecode)),
              "out_feat": np.array(output, dtype=np.int64), "depth": np.array(depth)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    partial.mkdir(exist_ok=True)
    for name, values in arrays.items():
        np.save(partial / f"{name}.npy", values, allow_pickle=False)
    try:
        os.rename(partial, cache)
    except OSError:  # another process put it there first: theirs is the same
        shutil.rmtree(partial, ignore_errors=True)


def _load_cached_identifier() -> _WindowedIdentifier:
    """The identifier from the decompressed model (about 70 MB, written once). Its transition table
    is memory-mapped: every worker process shares the same pages of the OS cache and reads only the
    ones its documents touch, instead of py3langid decompressing its LZMA file (about a second) in
    each."""
    cache = _model_cache_path()
    if not all((cache / f"{name}.npy").is_file() for name in _MODEL_ARRAYS):
        _write_model_cache(cache)

    def load(name: str, mmap: bool = False) -> np.ndarray:
        return np.load(cache / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)

    from py3langid import modelio

    # The small arrays as py3langid builds them (its row offsets as Python ints: shifted, they
    # overflow a uint16 array); the large transition table as the map.
    return _WindowedIdentifier(load("ptc"), load("pc"), load("classes").tolist(), load("nextmove", mmap=True),
                               load("out_feat").tolist(), norm_probs=True,
                               tk_row=modelio._to_array(load("nextmove_row")), depth=int(load("depth")))


@lru_cache(maxsize=1)
def _language_identifier() -> LanguageIdentifier:
    try:
        identifier = _load_cached_identifier()
    except Exception:  # no writable cache, another py3langid layout: the library's own loading
        identifier = _WindowedIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    # Guard against a py3langid whose automaton is not what the fast walk assumes: fall back to
    # the library's own walk when they disagree on a mixed-script sample.
    data = identifier._encode(_SELF_CHECK)
    if identifier.window_counts(data) != dict(visit_counts(identifier.tk_nextmove, identifier._rowbase,
                                                           identifier.tk_output, data)):
        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return identifier


LANGUAGE_SAMPLE_CHARS = 1_000  # per piece: start, middle and end of a long document
LANGUAGE_WHOLE_CHARS = 4 * LANGUAGE_SAMPLE_CHARS  # shorter documents are identified whole


def language_sample(text: str) -> str:
    """What language identification reads: the whole text when short, else three pieces of about
    LANGUAGE_SAMPLE_CHARS characters from its start, middle and end (cut at whitespace); with every
    run of whitespace made one space, so indentation and blank lines do not take the sample's room.
    A bounded sample, as large pipelines take, keeps the cost of a book the cost of a page; taking it
    from three places catches a document whose bulk is in another language than its opening."""
    if len(text) <= LANGUAGE_WHOLE_CHARS:
        return " ".join(text.split())
    size = LANGUAGE_SAMPLE_CHARS
    pieces = []
    for begin in (0, (len(text) - size) // 2, len(text) - size):
        piece = text[begin:begin + size]
        if begin > 0 and not text[begin - 1].isspace():  # drop the first word if cut
            piece = piece.split(None, 1)[-1] if len(piece.split(None, 1)) > 1 else ""
        if begin + size < len(text) and not text[begin + size].isspace():  # and the last one
            piece = piece.rsplit(None, 1)[0] if len(piece.rsplit(None, 1)) > 1 else ""
        pieces.append(" ".join(piece.split()))
    return " ".join(p for p in pieces if p)


def identify_language(text: str) -> tuple[str, float]:
    """(language, normalised probability) of :func:`language_sample` of ``text``."""
    lang, score = _language_identifier().classify(language_sample(text))
    return str(lang), float(score)


def language_decision(text: str, cfg: LanguageConfig) -> tuple[str | None, str, float]:
    """(reason to drop or None, language, score) — the score of the sample that decided."""
    lang, score = identify_language(text)
    if lang not in cfg.languages:
        return f"language:not_{'_'.join(cfg.languages)}", lang, score
    if score < cfg.min_score:
        return "language:low_confidence", lang, score
    return None, lang, score


def language_filter(text: str, cfg: LanguageConfig) -> str | None:
    return language_decision(text, cfg)[0]


# ---------------------------------------------------------------- Gopher

def _has_alpha(word: str) -> bool:
    return any(c.isalpha() for c in word)


def _has_alnum(word: str) -> bool:
    return any(c.isalnum() for c in word)


def gopher_quality(text: str, cfg: GopherQualityConfig, doc: Document | None = None) -> str | None:
    doc = _document(text, doc)
    words = doc.words
    n_words = len(words)
    if n_words < cfg.min_doc_words:
        return "gopher_quality:too_few_words"
    if n_words > cfg.max_doc_words:
        return "gopher_quality:too_many_words"
    # Every per-word count in one pass over the distinct words: words with a letter or digit (lone
    # punctuation is not a word for the length rule), words with a letter, stop words.
    stop = frozenset(cfg.stop_words)
    n_real = real_chars = alpha = n_stop = 0
    for word, count in doc.word_counts.items():
        if word.isalpha():
            n_real += count
            real_chars += len(word) * count
            alpha += count
        else:
            if _has_alnum(word):
                n_real += count
                real_chars += len(word) * count
            if _has_alpha(word):
                alpha += count
        if word.lower() in stop:
            n_stop += count
    avg_len = real_chars / max(n_real, 1)
    if avg_len < cfg.min_avg_word_length:
        return "gopher_quality:short_words"
    if avg_len > cfg.max_avg_word_length:
        return "gopher_quality:long_words"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n_words > cfg.max_symbol_word_ratio:
        return "gopher_quality:symbol_ratio"
    lines = doc.lines
    if lines:
        bullets = sum(1 for line in lines if line.startswith(("•", "●", "*", "-")))
        if bullets / len(lines) > cfg.max_bullet_lines_ratio:
            return "gopher_quality:bullet_lines"
        ellipsis = sum(1 for line in lines if line.endswith(("...", "…")))
        if ellipsis / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "gopher_quality:ellipsis_lines"
    if alpha / n_words < cfg.min_alpha_words_ratio:
        return "gopher_quality:non_alpha_words"
    if n_stop < cfg.min_stop_words:
        return "gopher_quality:few_stop_words"
    return None


def _duplicate_stats(elements: list[str], ignore_symbols: bool = False) -> tuple[int, int]:
    """(number of elements that repeat an earlier one, characters in them); with ``ignore_symbols``
    elements without a letter or digit never count as repeats (they still count as elements)."""
    seen: set[str] = set()
    dup_count = dup_chars = 0
    for element in elements:
        if element in seen and not (ignore_symbols and not _has_alnum(element)):
            dup_count += 1
            dup_chars += len(element)
        else:
            seen.add(element)
    return dup_count, dup_chars


def _ngram_hashes(word_ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit hash of every word n-gram (polynomial over word ids; collisions are negligible)."""
    count = len(word_ids) - n + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps on purpose
        for k in range(n):
            hashes = hashes * np.uint64(0x100000001B3) + word_ids[k:k + count]
    return hashes


def _top_ngram_chars(word_ids: np.ndarray, cum_len: np.ndarray, n: int) -> int:
    """Characters covered by the most frequent n-gram (its length times its count)."""
    if len(word_ids) < n:
        return 0
    values, first, counts = np.unique(_ngram_hashes(word_ids, n), return_index=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0
    start = int(first[top])
    return int(cum_len[start + n] - cum_len[start]) * int(counts[top])


def _duplicate_ngram_chars(word_ids: np.ndarray, word_len: np.ndarray, n: int) -> int:
    """Characters of words inside n-grams seen before (each word counted once)."""
    if len(word_ids) < n:
        return 0
    hashes = _ngram_hashes(word_ids, n)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    repeated = np.nonzero(first[inverse] != np.arange(len(hashes)))[0]
    if len(repeated) == 0:
        return 0
    marks = np.zeros(len(word_ids) + 1, dtype=np.int64)
    np.add.at(marks, repeated, 1)
    np.add.at(marks, repeated + n, -1)
    covered = np.cumsum(marks[:-1]) > 0
    return int(word_len[covered].sum())


def gopher_repetition(text: str, cfg: GopherRepetitionConfig, doc: Document | None = None) -> str | None:
    doc = _document(text, doc)
    total_chars = max(len(text), 1)
    paragraphs = [p for p in map(str.strip, _PARAGRAPHS.split(text)) if p]
    dup, dup_chars = _duplicate_stats(paragraphs)
    if paragraphs and dup / len(paragraphs) > cfg.max_dup_para_frac:
        return "gopher_repetition:dup_para_frac"
    if dup_chars / total_chars > cfg.max_dup_para_char_frac:
        return "gopher_repetition:dup_para_char_frac"
    lines = doc.lines
    dup, dup_chars = _duplicate_stats(lines, cfg.ignore_symbol_lines)
    if lines and dup / len(lines) > cfg.max_dup_line_frac:
        return "gopher_repetition:dup_line_frac"
    if dup_chars / total_chars > cfg.max_dup_line_char_frac:
        return "gopher_repetition:dup_line_char_frac"
    words = doc.words
    vocabulary = {word: i for i, word in enumerate(doc.word_counts)}  # ids in order of first appearance
    word_ids = np.fromiter(map(vocabulary.__getitem__, words), dtype=np.uint64, count=len(words))
    word_len = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    cum_len = np.concatenate([[0], np.cumsum(word_len)])
    word_chars = max(int(cum_len[-1]), 1)
    for n, limit in sorted(cfg.top_ngram_max_frac.items()):
        if _top_ngram_chars(word_ids, cum_len, n) / word_chars > limit:
            return f"gopher_repetition:top_{n}gram"
    # Words inside repeated (n+1)-grams are inside repeated n-grams too, so the covered characters
    # never grow with n: once they are within a longer n-gram's limit, that rule cannot fire.
    smallest_covered: int | None = None
    for n, limit in sorted(cfg.dup_ngram_max_frac.items()):
        if smallest_covered is not None and smallest_covered / word_chars <= limit:
            continue
        covered = _duplicate_ngram_chars(word_ids, word_len, n)
        smallest_covered = covered if smallest_covered is None else min(smallest_covered, covered)
        if covered / word_chars > limit:
            return f"gopher_repetition:dup_{n}gram"
    return None


# ---------------------------------------------------------------- C4

def _long_token(max_word_length: int) -> re.Pattern:
    """A word (whitespace-separated token) longer than ``max_word_length``."""
    pattern = _LONG_TOKEN_CACHE.get(max_word_length)
    if pattern is None:
        pattern = _LONG_TOKEN_CACHE[max_word_length] = re.compile(r"\S{%d}" % (max_word_length + 1))
    return pattern


def c4_filter(text: str, cfg: C4Config, doc: Document | None = None) -> tuple[str, str | None]:
    """(text with C4's bad lines removed, reason to drop the whole document or None)."""
    doc = _document(text, doc)
    lower = doc.lower
    if cfg.filter_lorem_ipsum and "lorem ipsum" in lower:
        return text, "c4:lorem_ipsum"
    if cfg.filter_curly_bracket and "{" in text:
        return text, "c4:curly_bracket"
    # Citations never span lines, so removing them from the whole text equals removing them per line.
    body = _CITATION.sub("", text) if cfg.remove_citations else text
    body_lower = lower if body == text else body.lower()
    # Rules that look for something absent from the whole text cannot drop any line: skip them.
    check_js = cfg.filter_javascript and "javascript" in body_lower
    check_policy = cfg.filter_policy and any(p in body_lower for p in POLICY_SUBSTRINGS)
    check_long = _long_token(cfg.max_word_length).search(body) is not None
    need_words = cfg.min_words_per_line > 0 or check_long
    check_punct = cfg.filter_no_terminal_punct
    kept_lines = []
    for line in body.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept_lines.append("")  # keep paragraph breaks
            continue
        if check_punct and not stripped.endswith(TERMINAL_PUNCTUATION):
            continue
        if need_words:
            words = stripped.split()
            if len(words) < cfg.min_words_per_line:
                continue
            if check_long and any(len(w) > cfg.max_word_length for w in words):
                continue
        if check_js or check_policy:
            line_lower = stripped.lower()
            if check_js and "javascript" in line_lower:
                continue
            if check_policy and any(p in line_lower for p in POLICY_SUBSTRINGS):
                continue
        kept_lines.append(line.rstrip())
    cleaned = _MANY_NEWLINES.sub("\n\n", "\n".join(kept_lines)).strip()
    if not cleaned:
        return cleaned, "c4:no_lines_left"
    if len(_SENTENCE_END.findall(cleaned)) < cfg.min_num_sentences:
        return cleaned, "c4:too_few_sentences"
    return cleaned, None


# ---------------------------------------------------------------- FineWeb

FINEWEB_STOP_CHARS = (".", "'", '"', "!", "?")


def _word_tokens(text: str) -> int:
    """Words as FineWeb counts them (NLTK's Treebank word tokenizer, which needs no downloaded data)."""
    from nltk.tokenize import NLTKWordTokenizer

    return len(NLTKWordTokenizer().tokenize(text))


def fineweb_filter(text: str, cfg: FineWebConfig, doc: Document | None = None) -> str | None:
    """FineWeb's line rules exactly as datatrove's FineWebQualityFilter computes them: over every line
    of ``text.split("\n")`` (empty lines included, not stripped), punctuation ratio ``<=``, short-line
    ratio ``>=``, duplicated-line characters over all characters but newlines ``>=``, newlines per
    word-tokenizer word ``>``."""
    lines = text.split("\n")
    if sum(line.endswith(FINEWEB_STOP_CHARS) for line in lines) / len(lines) <= cfg.line_punct_thr \
            and not (cfg.line_punct_exclude_zero and not any(line.endswith(FINEWEB_STOP_CHARS) for line in lines)):
        return "fineweb:line_punct_ratio"
    if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) >= cfg.short_line_thr:
        return "fineweb:short_line_ratio"
    _, dup_chars = _duplicate_stats([line for line in lines if line.strip()])
    if dup_chars / max(len(text) - text.count("\n"), 1) >= cfg.char_duplicates_ratio:
        return "fineweb:char_dup_ratio"
    newlines = text.count("\n")
    # The tokenizer splits punctuation off words, so it never finds fewer words than str.split():
    # when the ratio passes with whitespace words it passes with the tokenizer's, and costs nothing.
    if newlines / max(len(_document(text, doc).words), 1) > cfg.new_line_ratio \
            and newlines / max(_word_tokens(text), 1) > cfg.new_line_ratio:
        return "fineweb:list_ratio"
    return None


def apply_filters(text: str, cfg: FiltersConfig, preset: str = "web") -> tuple[str, str | None]:
    """The quality-filter steps of the default pipeline on one text, judged by ``preset``:
    (possibly edited text, first reason to drop or None). The stage runs the same steps
    (:mod:`pipelines.data.steps`); this is the short way to try the filters on a text."""
    from pipelines.data.steps import (
        C4Step,
        Doc,
        FineWebStep,
        GopherQualityStep,
        GopherRepetitionStep,
        LanguageStep,
        Pipeline,
        Rejection,
    )

    steps = [cls(cfg) for cls in (LanguageStep, GopherRepetitionStep, GopherQualityStep, C4Step, FineWebStep)]
    doc = Doc("text", text, "text", preset="web" if preset == "published" else preset)
    result = Pipeline(steps).run(doc)
    if isinstance(result, Rejection):
        return doc.text, result.reason
    return result.text, None


# ---------------------------------------------------------------- presets chosen per document

_CODE_LINE = re.compile(r"^(?:    |\t)|^\s*(?:>>>|\$ |def |class |import |from \S+ import |return\b|#include|@\w)"
                        r"|[{}]\s*$|[)=\w\]]\);?\s*$|=.*;\s*$")
_SPEAKER_LINE = re.compile(r"^[A-Z][A-Z .'-]{1,30}[.:]?$")  # "HAMLET." / "KING LEAR:" / "ACT I."
BOOK_WORDS = 20_000
SHAPE_CHARS = 20_000


def choose_preset(text: str, fmt: str, meta: dict[str, Any], source: str, words: list[str] | None = None) -> str:
    """``auto``: the preset that fits a document, from its format and shape.

    - code_docs: the built-in corpus (Python's documentation), or text where at least 15% of the lines
      look like code (indented blocks, prompts, definitions, braces, calls and assignments ending a line);
    - web: HTML pages, and records that carry a URL;
    - books: book-length text (20k words and more), and text shaped like verse or a play (mostly short
      lines, or speaker labels such as ``HAMLET.``);
    (line shapes are read on the first 20,000 characters)
    - web otherwise (the published rules are the default for text of unknown origin).
    ``words`` is ``text.split()`` when the caller has it already.
    """
    if source == "builtin" or meta.get("kind") in ("docstrings", "pydoc_topic"):
        return "code_docs"
    if fmt == "html" or "url" in meta:
        return "web"
    # The shape is read on the first SHAPE_CHARS characters: enough to tell, bounded on long works.
    lines = [line for line in text[:SHAPE_CHARS].split("\n") if line.strip()]
    if lines:
        code = sum(1 for line in lines if _CODE_LINE.search(line))
        if code / len(lines) >= 0.15:
            return "code_docs"
    if len(text) >= BOOK_WORDS * 5 and len(text.split() if words is None else words) >= BOOK_WORDS:
        return "books"
    if len(lines) >= 8:
        short = sum(1 for line in lines if len(line.strip()) <= 60) / len(lines)
        speakers = sum(1 for line in lines if _SPEAKER_LINE.match(line.strip())) / len(lines)
        if short >= 0.6 or speakers >= 0.1:
            return "books"
    return "web"


# ---------------------------------------------------------------- what triggered a rule (for inspect)

def _first(lines: list[str], predicate) -> str:
    return next((line for line in lines if predicate(line)), "")


def explain(reason: str, text: str, cfg: Any) -> str:
    """The part of ``text`` that made rule ``reason`` fire: a line, an n-gram, a character or a ratio.
    Called only for rejected documents, so its cost does not matter."""
    rule = reason.split(":", 1)[1] if ":" in reason else reason
    lines = text.split("\n")
    words = text.split()
    try:
        if rule == "curly_bracket":
            return _first(lines, lambda line: "{" in line)[:200]
        if rule == "lorem_ipsum":
            at = text.lower().find("lorem ipsum")
            return text[max(at - 40, 0):at + 60]
        if rule == "line_punct_ratio":
            ended = sum(line.endswith(FINEWEB_STOP_CHARS) for line in lines)
            return f"{ended}/{len(lines)} lines end in punctuation; e.g. {_first(lines, lambda x: x.strip() and not x.endswith(FINEWEB_STOP_CHARS))[:120]!r}"
        if rule == "short_line_ratio":
            short = sum(len(line) <= cfg.short_line_length for line in lines)
            return f"{short}/{len(lines)} lines of <= {cfg.short_line_length} chars; e.g. {_first(lines, lambda x: 0 < len(x) <= cfg.short_line_length)!r}"
        if rule in ("char_dup_ratio", "dup_line_frac", "dup_line_char_frac", "dup_para_frac", "dup_para_char_frac"):
            parts = [p.strip() for p in (_PARAGRAPHS.split(text) if "para" in rule else lines) if p.strip()]
            seen: set[str] = set()
            repeated = next((p for p in parts if p in seen or seen.add(p)), "")
            return f"repeated: {repeated[:200]!r}"
        if rule == "list_ratio":
            return f"{text.count(chr(10))} newlines for {len(words)} words"
        if rule.startswith("top_") or rule.startswith("dup_") and rule.endswith("gram"):
            n = int(rule.split("_")[1].removesuffix("gram"))
            grams: dict[tuple[str, ...], int] = {}
            for i in range(len(words) - n + 1):
                gram = tuple(words[i:i + n])
                grams[gram] = grams.get(gram, 0) + 1
            gram, count = max(grams.items(), key=lambda kv: kv[1]) if grams else ((), 0)
            return f"{' '.join(gram)!r} x{count}"
        if rule == "symbol_ratio":
            return f"{text.count('#')} '#', {text.count('...') + text.count('…')} ellipses for {len(words)} words"
        if rule in ("too_few_words", "too_many_words"):
            return f"{len(words)} words"
        if rule in ("short_words", "long_words"):
            longest = max(words, key=len) if words else ""
            return f"mean word length {sum(map(len, words)) / max(len(words), 1):.1f}; longest {longest[:60]!r}"
        if rule == "non_alpha_words":
            return "e.g. " + repr([w for w in words if not _has_alpha(w)][:8])
        if rule == "few_stop_words":
            return f"stop words found: {sorted({w.lower() for w in words} & set(cfg.stop_words))}"
        if rule in ("bullet_lines", "ellipsis_lines"):
            return _first(lines, lambda x: x.strip().startswith(("•", "●", "*", "-")) or x.strip().endswith(("...", "…")))[:200]
        if rule in ("too_few_sentences", "no_lines_left"):
            return f"{len(_SENTENCE_END.findall(text))} sentence ends; first line {lines[0][:120]!r}"
    except Exception as err:  # an explanation must never drop or keep a document
        return f"(no detail: {type(err).__name__})"
    return ""
