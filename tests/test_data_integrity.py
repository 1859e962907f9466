"""Nothing lost, nothing leaked (issue 14): every input byte and file is accounted for, and no raw
PII reaches anything the data stage writes. Unit tests without Ray, plus the CLI's check of --run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.data.pii import PIIConfig, redact
from pipelines.data.readers import ReadConfig, SkippedFile, read_input_file, resolve_inputs
from pipelines.data.records import to_table

ROOT = Path(__file__).resolve().parent.parent


def _records(path, skipped=None, **cfg):
    files = resolve_inputs([str(path)], ReadConfig(**cfg), skipped)
    return [r for f in files for r in read_input_file(f, ReadConfig(**cfg))]


def test_bom_file_keeps_its_first_record(tmp_path):
    lines = [json.dumps({"text": f"document {i}"}) for i in range(3)]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    (tmp_path / "bom.txt").write_bytes("\ufeffa whole text file".encode())
    records = _records(tmp_path / "bom.jsonl")
    assert [r["reason"] for r in records] == ["", "", ""]
    assert records[0]["text"] == "document 0"
    assert _records(tmp_path / "bom.txt")[0]["text"] == "a whole text file"
    per_line = _records(tmp_path / "bom.txt", text_per_line=True)
    assert per_line[0]["text"] == "a whole text file"


def test_skipped_files_in_a_directory_are_counted_with_reasons(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "good.jsonl").write_text(json.dumps({"text": "kept"}) + "\n")
    (corpus / "sub" / "also.txt").write_text("kept too")
    (corpus / ".hidden.jsonl").write_text(json.dumps({"text": "hidden"}) + "\n")
    (corpus / "dangling.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    (corpus / "loop_a.jsonl").symlink_to(corpus / "loop_b.jsonl")  # a symlink loop cannot be opened
    (corpus / "loop_b.jsonl").symlink_to(corpus / "loop_a.jsonl")
    os.mkfifo(corpus / "pipe.jsonl")
    skipped: list[SkippedFile] = []
    files = resolve_inputs([str(corpus)], ReadConfig(), skipped)
    assert [f.source for f in files] == ["corpus/good.jsonl", "corpus/sub/also.txt"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons == {".hidden.jsonl": "hidden", "dangling.jsonl": "dangling_symlink",
                       "loop_a.jsonl": "unreadable", "loop_b.jsonl": "unreadable",
                       "pipe.jsonl": "not_a_regular_file"}
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        (corpus / "locked.jsonl").write_text("{}")
        (corpus / "locked.jsonl").chmod(0)
        skipped = []
        resolve_inputs([str(corpus)], ReadConfig(), skipped)
        assert {Path(s.path).name: s.reason for s in skipped}["locked.jsonl"] == "unreadable"


def test_oversized_records_count_their_real_bytes(tmp_path):
    big = json.dumps({"text": "x" * 5000})
    (tmp_path / "big.jsonl").write_text(big + "\n" + json.dumps({"text": "small"}) + "\n")
    (tmp_path / "big.txt").write_text("y" * 7000)
    (tmp_path / "lines.txt").write_text("z" * 6000 + "\nshort\n")
    records = _records(tmp_path / "big.jsonl", max_document_bytes=1000)
    assert records[0]["reason"] == "quarantine:too_large" and records[0]["bytes_in"] == len(big)
    whole = _records(tmp_path / "big.txt", max_document_bytes=1000)
    assert whole[0]["reason"] == "quarantine:too_large" and whole[0]["bytes_in"] == 7000
    lines = _records(tmp_path / "lines.txt", max_document_bytes=1000, text_per_line=True)
    assert lines[0]["reason"] == "quarantine:too_large" and lines[0]["bytes_in"] == 6000


def test_parquet_integer_text_is_not_a_string(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, None, 3]}), tmp_path / "ints.parquet")
    reasons = [r["reason"] for r in _records(tmp_path / "ints.parquet")]
    assert reasons == ["quarantine:text_not_a_string", "quarantine:missing_text_field", "quarantine:text_not_a_string"]


def test_lone_surrogates_are_replaced_at_read_time(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud800 half", "title": "t\\udc00"}\n'
                                      '{"text": "a pair \\ud83d\\ude00 stays"}\n')
    records = _records(tmp_path / "s.jsonl")
    assert records[0]["text"] == "broken \ufffd half" and json.loads(records[0]["meta"]) == {"title": "t\ufffd"}
    assert records[1]["text"] == "a pair \U0001F600 stays"
    to_table(records)  # Arrow takes them as strings (no fallback to pickled objects)


@pytest.mark.parametrize("card", ["4111  1111  1111  1111", "4111 1111 1111 1111", "4111-1111-1111-1111",
                                  "4111 - 1111 - 1111 - 1111", "4111111111111111", "3782 822463 10005",
                                  "4111\u00a01111\u00a01111\u00a01111", "5500--0000--0000--0004"])
def test_card_numbers_in_the_formats_real_text_uses_are_masked(card):
    text, counts = redact(f"Paid with {card}, thanks.", PIIConfig())
    assert text == "Paid with <CARD_NUMBER>, thanks." and counts["card"] == 1


@pytest.mark.parametrize("phone", ["+33 1 42 68 53 00", "01 42 68 53 00", "+33 6 12 34 56 78", "+33.1.42.68.53.00",
                                   "+49 30 1234 5678", "+1 (555) 123-4567", "+44 20 7946 0958", "0201 2345 6789",
                                   "2020 1234 5678"])
def test_phone_numbers_in_french_and_international_layouts_are_masked(phone):
    text, counts = redact(f"Appelez le {phone} demain.", PIIConfig())
    assert text == "Appelez le <PHONE> demain." and counts["phone"] == 1


@pytest.mark.parametrize("text", ["Python 3.11.7 on 2023-12-04", "steps 1 2 3 4 5", "+1 2 3", "score 12 34 56 78",
                                  "ISBN 978-0-13-110362-7", "in 1990 1991 1992 and", "seasons 2019-2020-2021",
                                  "editions 1865.1872.1897"])
def test_numbers_that_are_not_phones_stay(text):
    assert redact(text, PIIConfig())[0] == text


def test_rejected_and_quarantined_rows_are_masked_unless_asked():
    from pipelines.data.clean import CleanConfig
    from pipelines.data.filters import FiltersConfig
    from pipelines.data.records import make_record, quarantine
    from pipelines.data.stage import ProcessBatch

    french = ("Écrivez à jean.dupont@example.fr ou appelez le +44 20 7946 0958. Le chat dort sur le canapé "
              "pendant que la pluie tombe doucement sur les toits de la ville. ") * 3
    rows = [make_record("fr", french, "s", "s:1", meta={"contact": "jean.dupont@example.fr"}),
            quarantine("bad", "s", "s:2", "malformed_json", b'{"text": "mail bob@example.com card 4111 1111 1111 1111')]
    masked = ProcessBatch.from_configs(CleanConfig(), FiltersConfig(), PIIConfig())(to_table(rows)).to_pylist()
    assert masked[0]["reason"].startswith("language:")
    for row in masked:
        assert "@example" not in row["text"] + row["meta"] and "4111" not in row["text"]
    assert "<EMAIL>" in masked[0]["text"] and "<PHONE>" in masked[0]["text"]
    raw = ProcessBatch.from_configs(CleanConfig(), FiltersConfig(), PIIConfig(keep_raw_in_rejects=True))(to_table(rows)).to_pylist()
    assert "jean.dupont@example.fr" in raw[0]["text"] and "bob@example.com" in raw[1]["text"]


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable"])
def test_bad_run_directory_exits_2_in_one_line_before_any_work(tmp_path, kind):
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    run = {"file": target, "under_a_file": target / "run", "unwritable": Path("/proc/groundup-run")}[kind]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # were Ray started, it would be a fresh local one: the check comes first
    result = subprocess.run([sys.executable, "-m", "pipelines.data", "--input", "builtin", "--run", str(run)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(run) in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_byte_ranges_read_exactly_the_records_of_the_whole_file(tmp_path):
    """Large files are read in parallel byte ranges: the ranges give the whole file's records, ids and
    line numbers included, wherever the cuts fall (inside lines, on newlines, in blank lines)."""
    import random

    from pipelines.data.readers import split_ranges

    rng = random.Random(5)
    lines = [json.dumps({"text": "w" * rng.randrange(0, 300), "n": i}) for i in range(200)]
    for i in rng.sample(range(200), 20):
        lines[i] = ""  # blank lines hold no record but count as lines
    lines[7] = "{broken"
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())  # BOM, no final newline
    size = path.stat().st_size
    (whole,) = resolve_inputs([str(path)], ReadConfig())
    expected = list(read_input_file(whole, ReadConfig()))
    for target in (1, 37, 300, 301, 4096, size - 1, size):
        ranges = split_ranges(whole, size, target, ReadConfig())
        got = [r for f in ranges for r in read_input_file(f, ReadConfig())]
        assert got == expected, target
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"line {i}\n" for i in range(100)))
    (per_line,) = resolve_inputs([str(text)], ReadConfig(text_per_line=True))
    ranges = split_ranges(per_line, text.stat().st_size, 50, ReadConfig(text_per_line=True))
    assert len(ranges) > 5
    got = [r["id"] for f in ranges for r in read_input_file(f, ReadConfig(text_per_line=True))]
    assert got == [f"lines.txt:{i}" for i in range(1, 101)]
    assert split_ranges(per_line, 10_000, 50, ReadConfig()) == [per_line]  # a whole-file document is not cut


def test_fix_unicode_equals_ftfy_on_crlf_text():
    import ftfy

    from pipelines.data.clean import fix_unicode

    samples = ["plain line\r\nsecond line\r\n", "Caf\u00c3\u00a9 ok\r\nnext &amp; more\r\n<b>x</b> &lt;\r\n",
               "mixed\r\nends\nhere\r\n\r\n\u201cquoted\u201d\r\nlone\rcarriage", "\u00e2\u0080\u0099 mojibake\r\nline"]
    for text in samples:
        assert fix_unicode(text) == ftfy.fix_text(text, normalization=None), text


def test_pii_prefilters_never_skip_what_the_full_patterns_replace(monkeypatch):
    """Each prefilter is a necessary condition of its pattern: redacting with them gives what the full
    patterns alone give (here with every prefilter made to match anything), on addresses, numbers and
    look-alikes mixed with noise."""
    import random
    import re

    from pipelines.data import pii

    rng = random.Random(0)
    pieces = ["4111 1111 1111 1111", "4111  1111-1111 1111", "192.168.0.1", "10.0.0.12.", "1.2.3.4.5", "fe80::1:2",
              "2001:db8::ff00:42:8329", "::ffff:1:2:3", "1::2:3", "a:b:c:d:e:f:0:1", "::1", "a::b", "x[1::2]",
              "Example::", "jane.doe@example.org", "a@b.c", "x@localhost", "@home.", "+33 1 42 68 53 00",
              "01 42 68 53 00", "555-123-4567", "(555) 123-4567", "+1 2 3", "2023-12-04", "3.11.7"]
    texts = ["".join(rng.choice(pieces) if rng.random() < 0.3 else rng.choice("0123456789abcdef:.-+() @\u00a0xyz\n")
                     for _ in range(rng.randrange(1, 40))) for _ in range(3000)]
    with_prefilters = [redact(t, PIIConfig()) for t in texts]
    for name in ("_MAY_BE_EMAIL", "_MAY_BE_CARD", "_MAY_BE_IPV4", "_MAY_BE_IPV6", "_MAY_BE_PHONE"):
        monkeypatch.setattr(pii, name, re.compile(""))
    assert with_prefilters == [redact(t, PIIConfig()) for t in texts]
    assert sum(counts["ip"] for _, counts in with_prefilters) > 100  # the IPv6 and IPv4 forms were taken
