"""The data steps' fast paths give the results of the slow way (issue 14's speed target): the Unicode
fixer calls ftfy only where it can change something, language identification reads a bounded
sample of long documents. No Ray: the functions run in process, on the built-in corpus and on the
benchmark's corpus of real documents (text shipped with the installed packages)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.clean import _ftfy_checks, badness_needs_non_ascii, fix_unicode


@pytest.fixture(scope="module")
def real_documents(tmp_path_factory) -> list[str]:
    """The texts of benchmarks/bench_data.py's real corpus (about 12 MB of documents of uneven size)."""
    from benchmarks.bench_data import real_corpus
    from pipelines.data.readers import ReadConfig, read_input_file, resolve_inputs

    directory = real_corpus(tmp_path_factory.mktemp("real"), 12.0)
    return [r["text"] for f in resolve_inputs([str(directory)], ReadConfig())
            for r in read_input_file(f, ReadConfig())]


@pytest.fixture(scope="module")
def builtin_documents() -> list[str]:
    from pipelines.data.builtin import iter_builtin_documents

    return [d["text"] for d in iter_builtin_documents()]


# Lines that exercise every way out of the fast path: mojibake (also at a line start, which ftfy's
# pattern anchors with "^"), HTML entities before and after a "<", curly quotes (uncurled by ftfy)
# next to mojibake, ligatures, full-width forms, C1 and other control characters, lone CRs,
# terminal escapes, a byte-order mark, Unicode line separators.
TRICKY = [
    "Caf\u00c3\u00a9 na\u00efve", "first line\n\u00c3 line start", "\u00c3 text start", "a &amp; b &eacute;\n<b>x</b> &lt;",
    "<p>tag first</p>\n&amp; after", "\u201cquoted\u201d and \u2018single\u2019\nplain", "l\u2019\u00e9t\u00e9 \u00e2\u0080\u0099",
    "\u2019\u00c3 \u00a9", "\ufb01ne \ufb02ow", "\uff26\uff35\uff2c\uff2c width\u3000space", "c1 \x85 \x92 chars",
    "bell\x07 and \x1b[31mred\x1b[0m", "lone\rcarriage\r\nand crlf", "\ufeffbom", "sep\u2028line\u2029para",
    "plain ASCII only\nsecond line", "\u00e2\u0080\u009cdouble mojibake\u00e2\u0080\u009d",
    "ok caf\u00e9 \u2014 dash \u2026 ellipsis \u20ac5", "\u0412\u0413\u0420 cyr", "\u00d8\u00b3\u00d9\u0084 arabic mojibake",
]


def test_ftfy_pattern_can_be_searched_near_non_ascii_characters():
    from ftfy.badness import BADNESS_RE

    assert badness_needs_non_ascii(BADNESS_RE) and _ftfy_checks()[4]
    import re

    from pipelines.data.clean import badness_anchor_chars

    anchors = badness_anchor_chars(BADNESS_RE)
    assert ord("\u00c3") in anchors and not {ord(c) for c in "\u2019\u2014\u2013\u2026"} & anchors
    # one character each alternative must hold is enough: "é" for the first, the class for the second
    assert badness_anchor_chars(re.compile("x\u00e9\u00e8|[\u00c0-\u00c2]y")) == {0xE9, 0xC0, 0xC1, 0xC2}

    assert not badness_needs_non_ascii(re.compile("ab$|\u00e9"))    # an anchor other than "^"
    assert not badness_needs_non_ascii(re.compile("x\u00e9|ab"))    # an ASCII-only alternative
    assert not badness_needs_non_ascii(re.compile("\u00e9" + "x" * 8))  # wider than the context searched


def test_fix_unicode_equals_ftfy_on_tricky_lines():
    import ftfy

    for text in TRICKY + ["\n".join(TRICKY), "\r\n".join(TRICKY)]:
        assert fix_unicode(text) == ftfy.fix_text(text, normalization=None), text


def test_fix_unicode_equals_ftfy_on_the_builtin_and_real_corpora(builtin_documents, real_documents):
    import ftfy

    from pipelines.data.clean import _FTFY_UNSAFE

    # Plain ASCII documents are returned as they are before any check; everything else is compared
    # (on its first 100,000 characters: ftfy itself takes seconds per megabyte).
    texts = [t[:100_000] for t in builtin_documents + real_documents if _FTFY_UNSAFE.search(t)]
    assert len(texts) > 250
    for text in texts:
        assert fix_unicode(text) == ftfy.fix_text(text, normalization=None), text[:80]


# ---------------------------------------------------------------- language identification on a sample

FRENCH = ("Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de la ville. "
          "Les enfants rentrent de l'école en courant, et leur mère prépare une soupe aux légumes. ")
ENGLISH = ("The river runs through the old town and the bridge that crosses it was built of stone. "
           "People walk to the market in the morning, and they buy bread, fruit and fish for the day. ")


def test_language_sample_is_bounded_and_cut_at_words():
    from pipelines.data.filters import LANGUAGE_SAMPLE_CHARS, LANGUAGE_WHOLE_CHARS, language_sample

    assert language_sample("  short\n\n   text\t here ") == "short text here"
    book = ENGLISH * 2000  # 360 KB
    sample = language_sample(book)
    assert len(sample) <= 3 * LANGUAGE_SAMPLE_CHARS + 2
    assert set(sample.split()) <= set(book.split())  # whole words only
    assert len(language_sample("x " * LANGUAGE_WHOLE_CHARS)) < len("x " * LANGUAGE_WHOLE_CHARS)


def test_a_long_document_is_identified_from_its_sample_as_from_its_whole_text(builtin_documents, real_documents):
    from pipelines.data.clean import CleanConfig, clean_document
    from pipelines.data.filters import LANGUAGE_WHOLE_CHARS, _language_identifier, identify_language

    identifier = _language_identifier()
    compared = 0
    for text in [ENGLISH * 500, FRENCH * 500] + builtin_documents + real_documents:
        text = clean_document(text, False, CleanConfig())[0]
        if len(text) <= LANGUAGE_WHOLE_CHARS:
            continue
        whole, score = identifier.classify(" ".join(text.split()))
        if score < 0.99:  # documents the whole text does not settle (tables of numbers, code) say nothing
            continue
        assert identify_language(text)[0] == whole, text[:80]
        compared += 1
    assert compared > 300


def test_a_document_whose_bulk_is_another_language_is_caught():
    from pipelines.data.filters import LanguageConfig, language_decision

    cfg = LanguageConfig()
    # An English opening of 3 KB before 60 KB of French: the first 10k characters alone would keep it.
    assert language_decision(ENGLISH * 17 + FRENCH * 330, cfg)[:2] == ("language:not_en", "fr")
    assert language_decision(FRENCH * 17 + ENGLISH * 330, cfg)[0] is None  # a short foreign preface stays
    assert language_decision(ENGLISH * 400, cfg)[0] is None


def test_the_cached_language_model_scores_as_py3langid(tmp_path, monkeypatch):
    """The decompressed model kept between processes (GROUNDUP_CACHE_DIR) gives py3langid's scores."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from pipelines.data import filters

    monkeypatch.setenv("GROUNDUP_CACHE_DIR", str(tmp_path))
    written = filters._load_cached_identifier()   # decompresses and writes the cache
    read = filters._load_cached_identifier()      # reads it
    assert filters._model_cache_path().parent == tmp_path and filters._model_cache_path().is_dir()
    assert not list(tmp_path.glob("*.tmp"))
    assert isinstance(read._next, np.memmap)  # the large table is shared through the OS cache, not copied
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    assert written._depth == read._depth >= 4
    for text in (ENGLISH, FRENCH, "東京は晴れ", "Привет, мир", "", "12345 ..."):
        assert (read._decide(text) == reference._decide(text)).all(), text
