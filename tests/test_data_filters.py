"""Unit tests (no Ray) of cleaning, quality filters, PII redaction and the readers' quarantine."""
from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from pipelines.config import ConfigError
from pipelines.data.clean import CleanConfig, clean_document
from pipelines.data.filters import (
    C4Config,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    apply_filters,
    c4_filter,
    effective_filters,
    fineweb_filter,
    gopher_quality,
    gopher_repetition,
    language_filter,
)
from pipelines.data.pii import PIIConfig, redact
from pipelines.data.readers import ReadConfig, read_input_file, resolve_inputs

PROSE = (
    "The river runs through the old town and the bridge that crosses it was built of stone. "
    "People walk to the market in the morning, and they buy bread, fruit and fish for the day. "
    "In the evening the lamps are lit, the shops close, and the square fills with music and talk. "
    "Visitors say that the town has a quiet charm that is hard to find in larger cities today. "
    "The museum keeps maps of the valley that show how the roads have changed over the centuries.\n\n"
    "A small school stands near the church, with a garden where the children grow beans and herbs. "
    "Teachers take them to the hills in spring to learn the names of birds, trees and flowers."
)


def test_clean_repairs_unicode_and_whitespace():
    text, reason = clean_document("Caf\u00c3\u00a9  \r\nline two   \n\n\n\nend\x00", False, CleanConfig())
    assert reason == ""
    assert text == "Café\nline two\n\nend"


def test_clean_extracts_html_main_text():
    html = ("<html><head><title>t</title></head><body><nav>Home | About | Login</nav><article>"
            f"<p>{PROSE}</p></article><footer>Copyright 2024</footer></body></html>")
    text, reason = clean_document(html, True, CleanConfig())
    assert reason == "" and "river runs through the old town" in text and "Login" not in text
    assert clean_document("<html><body><div></div></body></html>", True, CleanConfig())[1] == "extract:no_main_text"


def test_good_prose_passes_every_published_filter():
    assert apply_filters(PROSE, FiltersConfig()) == (PROSE, None)


def test_language_filter():
    assert language_filter(PROSE, LanguageConfig()) is None
    french = "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de la ville. " * 3
    assert language_filter(french, LanguageConfig()) == "language:not_en"


def test_language_scores_equal_py3langid_own_walk():
    """The vectorised DFA walk gives py3langid's exact scores, on any script and on broken bytes."""
    import random

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from pipelines.data.filters import _language_identifier, _WindowedIdentifier

    fast = _language_identifier()
    assert isinstance(fast, _WindowedIdentifier) and fast._depth >= 4
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(0)
    texts = [PROSE, "", "a", "  \n", "東京は晴れ", "Привет, мир", "Le chat dort sur le canapé. " * 20]
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 400))) for _ in range(50)]
    for text in texts:
        assert (fast._decide(text) == reference._decide(text)).all(), text[:40]


def test_gopher_quality_rules():
    cfg = GopherQualityConfig()
    assert gopher_quality("too short to be a document", cfg) == "gopher_quality:too_few_words"
    assert gopher_quality(" ".join(["#tag the of"] * 40), cfg) == "gopher_quality:symbol_ratio"
    assert gopher_quality(" ".join(["1234 5678 the and"] * 30), cfg) == "gopher_quality:non_alpha_words"
    assert gopher_quality(" ".join(["word"] * 60), cfg) == "gopher_quality:few_stop_words"
    bullets = "\n".join(f"- item number {i} of the list and more" for i in range(20))
    assert gopher_quality(bullets, cfg) == "gopher_quality:bullet_lines"
    assert gopher_quality(" ".join(["extraordinarilylongwords the"] * 30), cfg) == "gopher_quality:long_words"


def test_gopher_repetition_rules():
    cfg = GopherRepetitionConfig()
    repeated_lines = "\n".join(["the same line again and again"] * 10 + ["one different line here"])
    assert gopher_repetition(repeated_lines, cfg).startswith("gopher_repetition:dup_")
    repeated_ngrams = " ".join(["alpha beta gamma delta epsilon"] * 30)
    assert gopher_repetition(repeated_ngrams, cfg).startswith("gopher_repetition:")
    assert gopher_repetition(PROSE, cfg) is None


def test_c4_rules_edit_lines_and_drop_documents():
    cfg = C4Config()
    text = PROSE + "\nMenu\nPlease enable JavaScript to view this page.\nRead our privacy policy here."
    cleaned, reason = c4_filter(text, cfg)
    assert reason is None
    assert "Menu" not in cleaned and "JavaScript" not in cleaned and "privacy" not in cleaned
    assert c4_filter(PROSE + " lorem ipsum dolor.", cfg)[1] == "c4:lorem_ipsum"
    assert c4_filter(PROSE + " if (x) { y(); }", cfg)[1] == "c4:curly_bracket"
    assert c4_filter("One sentence only here.", cfg)[1] == "c4:too_few_sentences"


def test_fineweb_rules():
    cfg = FineWebConfig()
    assert fineweb_filter(PROSE, cfg) is None
    assert fineweb_filter("\n".join(f"Item {i} without punctuation here" for i in range(20)), cfg) \
        == "fineweb:line_punct_ratio"
    assert fineweb_filter("\n".join(["Short one."] * 3 + [f"Tiny {i}." for i in range(10)]), cfg) \
        == "fineweb:short_line_ratio"
    dup = PROSE + "\nThis line is repeated here.\nThis line is repeated here."
    assert fineweb_filter(dup, cfg) == "fineweb:char_dup_ratio"


def test_code_docs_preset_relaxes_but_explicit_settings_win():
    relaxed = effective_filters(FiltersConfig(), "code_docs")
    assert relaxed.c4.filter_curly_bracket is False and relaxed.c4.min_num_sentences == 1
    explicit = FiltersConfig.model_validate({"c4": {"filter_curly_bracket": True}})
    assert effective_filters(explicit, "code_docs").c4.filter_curly_bracket is True
    assert effective_filters(FiltersConfig(), "published") == FiltersConfig()


def test_pii_redaction_counts_each_kind():
    text = ("Write to jane.doe@example.org or call +1 (555) 123-4567. Server 10.0.0.12 and 2001:db8::ff00:42:8329. "
            "Card 4111 1111 1111 1111 but not 4111 1111 1111 1112. Python 3.11.7 was released 2023-12-04; "
            "slice a[::2] stays.")
    redacted, counts = redact(text, PIIConfig())
    assert counts == {"email": 1, "phone": 1, "ip": 2, "card": 1}
    for token in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CARD_NUMBER>"):
        assert token in redacted
    assert "3.11.7" in redacted and "2023-12-04" in redacted and "a[::2]" in redacted
    assert "4111 1111 1111 1112" in redacted


# ---------------------------------------------------------------- readers: corrupted and hostile input

def _records(path, **cfg):
    files = resolve_inputs([str(path)], ReadConfig(**cfg))
    return [r for f in files for r in read_input_file(f, ReadConfig(**cfg))]


def test_jsonl_bad_lines_are_quarantined_with_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": "good one", "url": "u1"}).encode(), b"{not json", b"\xff\xfe bad utf8",
             b"[1, 2, 3]", json.dumps({"body": "no text field"}).encode(), json.dumps({"text": 5}).encode(),
             b"[" * 50_000, json.dumps({"text": "x" * 300_000}).encode(), json.dumps({"text": "good two"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = _records(path, max_document_bytes=200_000)
    reasons = [r["reason"] for r in records]
    assert reasons == ["", "quarantine:malformed_json", "quarantine:invalid_utf8", "quarantine:not_a_json_object",
                       "quarantine:missing_text_field", "quarantine:text_not_a_string",
                       "quarantine:malformed_json", "quarantine:too_large", ""]
    assert records[0]["id"] == "mixed.jsonl:1" and json.loads(records[0]["meta"]) == {"url": "u1"}
    assert records[2]["location"] == "mixed.jsonl:line 3"


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_archives_keep_what_was_read_and_quarantine_the_rest(tmp_path, suffix):
    data = b"".join(json.dumps({"text": f"document number {i}"}).encode() + b"\n" for i in range(50_000))
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    whole.write_bytes(packed)
    cut.write_bytes(packed[: len(packed) // 2])
    assert [r["reason"] for r in _records(whole)] == [""] * 50_000
    records = _records(cut)
    assert records[-1]["reason"] == "quarantine:truncated_archive"
    assert all(r["reason"] == "" for r in records[:-1]) and 0 < len(records) - 1 < 50_000


def test_text_html_parquet_and_unknown_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one document\nspanning lines")
    (corpus / "b.txt").write_bytes(b"\xc3\x28 invalid")
    (corpus / "page.html").write_text("<html><body><p>hello</p></body></html>")
    (corpus / "notes.bin").write_bytes(b"\x00\x01")
    pq.write_table(pa.table({"text": ["p0", None, "p2"], "lang": ["en", "en", "fr"]}), corpus / "t.parquet")
    (corpus / "broken.parquet").write_bytes(b"PAR1 definitely not parquet")
    by_id = {r["id"]: r for r in _records(corpus)}
    assert by_id["corpus/a.txt"]["text"] == "one document\nspanning lines"
    assert by_id["corpus/b.txt"]["reason"] == "quarantine:invalid_utf8"
    assert json.loads(by_id["corpus/page.html"]["meta"]) == {"format": "html"}
    assert by_id["corpus/notes.bin"]["reason"] == "quarantine:unknown_format"
    assert by_id["corpus/t.parquet:0"]["text"] == "p0" and json.loads(by_id["corpus/t.parquet:2"]["meta"]) == {"lang": "fr"}
    assert by_id["corpus/t.parquet:1"]["reason"] == "quarantine:missing_text_field"
    assert by_id["corpus/broken.parquet:unreadable"]["reason"] == "quarantine:unreadable_parquet"
    per_line = _records(corpus / "a.txt", text_per_line=True)
    assert [r["id"] for r in per_line] == ["a.txt:1", "a.txt:2"]


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_inputs([str(tmp_path / "missing.jsonl")], ReadConfig())
    with pytest.raises(ConfigError, match="no files match"):
        resolve_inputs([str(tmp_path / "*.jsonl")], ReadConfig())
    (tmp_path / "x.weird").write_text("?")
    with pytest.raises(ConfigError, match="unknown format"):
        resolve_inputs([str(tmp_path / "x.weird")], ReadConfig())
