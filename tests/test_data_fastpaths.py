"""The data steps' fast paths give the results of the slow way (issue 14's speed target): the Unicode
fixer calls ftfy only where it can change something, language identification reads a bounded
sample of long documents. No Ray: the functions run in process, on the built-in corpus and on the
benchmark's corpus of real documents (text shipped with the installed packages)."""
from __future__ import annotations

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
