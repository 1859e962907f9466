"""Extraction and normalisation: main text out of HTML, Unicode repair, NFC, whitespace.

trafilatura pulls the main content out of a page (navigation, footers and boilerplate go); ftfy
repairs mojibake and other broken Unicode; NFC makes equal-looking text equal bytes (which exact
dedup relies on); whitespace is tidied line by line while keeping paragraph structure, which the
line-based quality filters and the tokenizer both need.
"""
from __future__ import annotations

import re
import unicodedata

from pydantic import Field

from pipelines.config import StrictModel

_TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0]+$", re.MULTILINE)
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


def fix_unicode(text: str) -> str:
    """Exactly ``ftfy.fix_text(text, normalization=None)``, without calling ftfy on safe lines.

    ftfy fixes a text one line (segment) at a time; the only state carried between segments is
    that HTML unescaping is switched off from the first segment containing "<" on. This loop keeps
    ftfy's segmentation and that state, and skips the segments no fixer can change (plain ASCII
    without "&" or control characters), which on typical text is nearly all of them.
    """
    if "\r\n" in text:
        # ftfy turns every CRLF into LF (fix_line_breaks); doing it first leaves CRLF files' plain
        # ASCII lines safe to skip instead of sending every line through ftfy.
        text = text.replace("\r\n", "\n")
    if _FTFY_UNSAFE.search(text) is None:
        return text
    import ftfy

    config = ftfy.TextFixerConfig(explain=False, normalization=None)
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
            segment = ftfy.fix_and_explain(segment, config).text
        out.append(segment)
        pos = textbreak
    return "".join(out)


def normalize_text(text: str, cfg: CleanConfig) -> str:
    if cfg.fix_unicode:
        # normalization=None: NFC is applied below (and can be switched off on its own).
        text = fix_unicode(text)
    if cfg.nfc:
        text = unicodedata.normalize("NFC", text)
    if cfg.normalize_whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        text = _TRAILING_SPACE.sub("", text)
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
