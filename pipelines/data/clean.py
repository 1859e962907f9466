"""Extraction and normalisation: main text out of HTML, Unicode repair, NFC, whitespace.

trafilatura pulls the main content out of a page (navigation, footers and boilerplate go); ftfy
repairs mojibake and other broken Unicode; NFC makes equal-looking text equal bytes (which exact
dedup relies on); whitespace is tidied line by line while keeping paragraph structure, which the
line-based quality filters and the tokenizer both need.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any

from pydantic import Field

from pipelines.config import StrictModel

_TRAILING_SPACE_CHARS = " \t\f\v\u00a0"
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
# C0/C1 control characters other than tab and newline carry no text and confuse tokenizers.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Printable ASCII, tab and newline, without "&": no ftfy fixer changes such a segment (mojibake,
# curly quotes, ligatures, widths and odd line breaks need non-ASCII; HTML entities need "&";
# terminal escapes and control characters need the characters excluded here).
_FTFY_UNSAFE = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


class CleanConfig(StrictModel):
    enabled: bool = True
    extract_html: bool = Field(True, description="extract main text from HTML documents with trafilatura")
    include_tables: bool = Field(True, description="trafilatura: keep text inside tables")
    fix_unicode: bool = Field(True, description="repair broken Unicode with ftfy")
    nfc: bool = Field(True, description="Unicode NFC normalisation")
    normalize_whitespace: bool = Field(True, description="CRLF->LF, strip trailing spaces, <=2 newlines in a row")


def extract_main_text(html: str, include_tables: bool = True) -> str | None:
    """The page's main text, or None when trafilatura finds none."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=include_tables,
                               favor_precision=True, deduplicate=False)


# Every alternative of ftfy's BADNESS_RE needs a non-ASCII character (of a known set) and spans at
# most 7 characters (checked on the installed ftfy by badness_anchor_chars): a match lies within 6
# characters of one of those.
BADNESS_CONTEXT = 8


def badness_needs_non_ascii(pattern: re.Pattern) -> bool:
    """Whether every alternative of ftfy's mojibake pattern needs a non-ASCII character and matches at
    most BADNESS_CONTEXT - 1 characters, and its only anchor or assertion is "^" (true of ftfy 6):
    then a match lies near a non-ASCII character and only those places need searching, and "^" with
    MULTILINE finds in a whole text what the pattern finds in any of its lines."""
    return badness_anchor_chars(pattern) is not None


def badness_anchor_chars(pattern: re.Pattern) -> frozenset[int] | None:
    """Code points of which every match of ftfy's mojibake pattern holds at least one (for each
    alternative, the smallest set of non-ASCII characters it must contain), or None when the
    pattern is not of the shape :func:`badness_needs_non_ascii` describes. Common non-ASCII
    characters of English text (’ — – … ·) are not among them."""
    try:
        from re import _constants as C  # Python 3.11+
        from re import _parser as parser
    except ImportError:  # pragma: no cover
        import sre_constants as C  # type: ignore[no-redef]
        import sre_parse as parser  # type: ignore[no-redef]

    def non_ascii(op: Any, av: Any) -> set[int] | None:
        if op is C.LITERAL:
            return {av} if av >= 128 else None
        if op is C.IN:
            codes: set[int] = set()
            for o, a in av:
                if o is C.LITERAL and a >= 128:
                    codes.add(a)
                elif o is C.RANGE and a[0] >= 128:
                    codes.update(range(a[0], a[1] + 1))
                else:
                    return None
            return codes
        return None

    def anchors_only_at_line_start(items: Any) -> bool:
        for op, av in items:
            if op is C.AT and av is not C.AT_BEGINNING or op in (C.ASSERT, C.ASSERT_NOT, C.GROUPREF):
                return False
            if op is C.BRANCH and not all(anchors_only_at_line_start(a) for a in av[1]):
                return False
            if op in (C.SUBPATTERN, C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT, C.ATOMIC_GROUP):
                if not anchors_only_at_line_start(av[-1]):
                    return False
        return True

    parsed = parser.parse(pattern.pattern, pattern.flags)
    if parsed.getwidth()[1] >= BADNESS_CONTEXT or not anchors_only_at_line_start(parsed):
        return None
    single = parsed.data[0] if len(parsed.data) == 1 else (None, None)
    alternatives = single[1][1] if single[0] is C.BRANCH else [parsed]
    anchors: set[int] = set()
    for alternative in alternatives:
        needed = [codes for codes in (non_ascii(o, a) for o, a in alternative) if codes]
        if not needed:
            return None
        anchors |= min(needed, key=len)
    return frozenset(anchors)


@lru_cache(maxsize=1)
def _ftfy_checks() -> tuple[Any, re.Pattern, re.Pattern, re.Pattern, bool, re.Pattern | None]:
    """(ftfy's fixer config, its characters that some fixer other than fix_encoding, uncurl_quotes and
    unescape_html changes, its HTML entity pattern, its mojibake pattern with ``^`` at every line
    start, whether the checks hold for this ftfy: :func:`badness_needs_non_ascii`, runs of the
    characters every mojibake match holds: :func:`badness_anchor_chars`), built from ftfy's
    own tables so they follow the installed ftfy; when they do not hold, ftfy runs on every line
    that is not plain ASCII."""
    import ftfy
    from ftfy import chardata
    from ftfy.badness import BADNESS_RE

    # fix_c1_controls and fix_line_breaks (C1, CR, U+2028/9, U+0085), fix_latin_ligatures,
    # fix_character_width, fix_surrogates, remove_terminal_escapes (ESC), remove_control_chars.
    codes = {*range(0x80, 0xA0), 0x0D, 0x2028, 0x2029, 0x1B, *chardata.LIGATURES, *chardata.WIDTH_MAP,
             *chardata.CONTROL_CHARS}
    trigger = "[" + "".join(re.escape(chr(c)) for c in sorted(codes)) + "\\ud800-\\udfff]"
    # BADNESS_RE's only anchor is a "^" (checked below): with MULTILINE it also matches at every line start, so one
    # search over a whole text finds a match whenever ftfy's search over any of its lines would.
    bad_lines = re.compile(BADNESS_RE.pattern, BADNESS_RE.flags | re.MULTILINE)
    config = ftfy.TextFixerConfig(explain=False, normalization=None)
    anchors = badness_anchor_chars(BADNESS_RE)
    runs = None
    if anchors:  # runs of those characters less than 16 characters apart, searched together
        inside = "".join(re.escape(chr(c)) for c in sorted(anchors))
        runs = re.compile(f"[{inside}](?:[^{inside}]{{0,16}}+[{inside}])*+")
    return config, re.compile(trigger), chardata.HTML_ENTITY_RE, bad_lines, anchors is not None, runs


def _ftfy_unchanged_or_uncurled(text: str, unescape: bool) -> str | None:
    """What ``ftfy.fix_and_explain`` makes of every line of ``text`` when it can be told cheaply, else
    None (run ftfy). When no fixer but uncurl_quotes can change the text (no HTML entity while
    unescaping is on, none of the characters the other fixers replace, no mojibake by ftfy's own
    ``is_bad``) before and after uncurling its quotes, ftfy's fixed-point loop returns the uncurled
    text: the text itself when it has no curly quotes."""
    from ftfy.fixes import uncurl_quotes

    _, trigger, entity, _, _, _ = _ftfy_checks()
    if trigger.search(text) or (unescape and entity.search(text)) or _may_be_bad(text):
        return None
    uncurled = uncurl_quotes(text)
    if uncurled != text and (_may_be_bad(uncurled) or (unescape and entity.search(uncurled))):
        return None
    return uncurled


def _may_be_bad(text: str) -> bool:
    """True when ftfy's ``is_bad`` is true on some line of ``text`` (perhaps also in a few other
    cases): its pattern searched only around the characters every match holds."""
    bad, runs = _ftfy_checks()[3], _ftfy_checks()[5]
    for run in runs.finditer(text):
        if bad.search(text, max(run.start() - BADNESS_CONTEXT, 0), run.end() + BADNESS_CONTEXT):
            return True
    return False


def fix_unicode(text: str) -> str:
    """Exactly ``ftfy.fix_text(text, normalization=None)``, calling ftfy only where it can change
    something.

    ftfy fixes a text one line (segment) at a time; the only state carried between segments is
    that HTML unescaping is switched off from the first segment containing "<" on. Most text needs
    no fixer at all: plain ASCII without "&" or control characters is returned at once; other text
    is checked as a whole with ftfy's own tables (:func:`_ftfy_unchanged_or_uncurled`), and only when
    that check fails does the loop below keep ftfy's segmentation and state, and run ftfy on the
    segments that fail the same check.
    """
    if "\r\n" in text:
        # ftfy turns every CRLF into LF (fix_line_breaks); doing it first leaves CRLF files' plain
        # ASCII lines safe to skip instead of sending every line through ftfy.
        text = text.replace("\r\n", "\n")
    if _FTFY_UNSAFE.search(text) is None:
        return text
    import ftfy

    config, fast = _ftfy_checks()[0], _ftfy_checks()[4]
    if fast and len(text) <= config.max_decode_length:  # every segment is a line
        # Unescaping is on until the first "<"; an entity anywhere sends the text to the loop.
        whole = _ftfy_unchanged_or_uncurled(text, unescape=True)
        if whole is not None:
            return whole
    out = []
    pos = 0
    while pos < len(text):
        textbreak = text.find("\n", pos) + 1
        if textbreak == 0:
            textbreak = len(text)
        if (textbreak - pos) > config.max_decode_length:
            textbreak = pos + config.max_decode_length
        segment = text[pos:textbreak]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        if _FTFY_UNSAFE.search(segment) is not None:
            fixed = _ftfy_unchanged_or_uncurled(segment, config.unescape_html == "auto") if fast else None
            segment = fixed if fixed is not None else ftfy.fix_and_explain(segment, config).text
        out.append(segment)
        pos = textbreak
    return "".join(out)


def strip_trailing_spaces(text: str) -> str:
    """Spaces, tabs and no-break spaces removed from the end of every line (what the regex
    ``[ \t\f\v\u00a0]+$`` with MULTILINE removes), by C-level string methods: a few ``in`` tests
    settle most texts, which have none."""
    if not any(c + "\n" in text for c in _TRAILING_SPACE_CHARS) and not text.endswith(tuple(_TRAILING_SPACE_CHARS)):
        return text
    return "\n".join(line.rstrip(_TRAILING_SPACE_CHARS) for line in text.split("\n"))


def normalize_text(text: str, cfg: CleanConfig) -> str:
    if cfg.fix_unicode:
        # normalization=None: NFC is applied below (and can be switched off on its own).
        text = fix_unicode(text)
    if cfg.nfc:
        text = unicodedata.normalize("NFC", text)
    if cfg.normalize_whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        text = strip_trailing_spaces(text)
        if "\n\n\n" in text:
            text = _MANY_BLANK_LINES.sub("\n\n", text)
        text = text.strip()
    return text


def clean_document(text: str, is_html: bool, cfg: CleanConfig) -> tuple[str, str]:
    """(cleaned text, reason) — reason is "" or why nothing usable is left."""
    if not cfg.enabled:
        return text, ""
    if is_html and cfg.extract_html:
        extracted = extract_main_text(text, cfg.include_tables)
        if not extracted or not extracted.strip():
            return "", "extract:no_main_text"
        text = extracted
    text = normalize_text(text, cfg)
    if not text.strip():
        return "", "clean:empty"
    return text, ""
