"""Source-aware presets, FineWeb's line rules against hand-computed values, and the step pipeline
(issue 14). No Ray: the steps run in process exactly as the stage's batch function runs them."""
from __future__ import annotations

import random

import pytest

from pipelines.data.clean import CleanConfig
from pipelines.data.filters import FiltersConfig, FineWebConfig, choose_preset, fineweb_filter
from pipelines.data.pii import PIIConfig
from pipelines.data.records import make_record, to_table
from pipelines.data.stage import ProcessBatch
from pipelines.data.steps import DEFAULT_STEPS, Doc, Pipeline, Rejection, build_steps

# Public domain: Shakespeare, Hamlet III.1 (speaker labels as in Gutenberg's edition), and Blake,
# "The Lamb" (Songs of Innocence, 1789) and "The Tyger" (Songs of Experience, 1794).
HAMLET = """HAMLET.
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them? To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin?

OPHELIA.
Good my lord,
How does your honour for this many a day?

HAMLET.
I humbly thank you; well, well, well.

OPHELIA.
My lord, I have remembrances of yours,
That I have longed long to re-deliver;
I pray you, now receive them.

HAMLET.
No, not I;
I never gave you aught."""

LAMB = """Little Lamb who made thee
Dost thou know who made thee
Gave thee life & bid thee feed.
By the stream & o'er the mead;
Gave thee clothing of delight,
Softest clothing wooly bright;
Gave thee such a tender voice,
Making all the vales rejoice!
Little Lamb who made thee
Dost thou know who made thee

Little Lamb I'll tell thee,
Little Lamb I'll tell thee!
He is called by thy name,
For he calls himself a Lamb:
He is meek & he is mild,
He became a little child:
I a child & thou a lamb,
We are called by his name.
Little Lamb God bless thee.
Little Lamb God bless thee."""

TYGER = """Tyger Tyger, burning bright,
In the forests of the night;
What immortal hand or eye,
Could frame thy fearful symmetry?

In what distant deeps or skies.
Burnt the fire of thine eyes?
On what wings dare he aspire?
What the hand, dare seize the fire?

And what shoulder, & what art,
Could twist the sinews of thy heart?
And when thy heart began to beat,
What dread hand? & what dread feet?

What the hammer? what the chain,
In what furnace was thy brain?
What the anvil? what dread grasp,
Dare its deadly terrors clasp!

When the stars threw down their spears
And water'd heaven with their tears:
Did he smile his work to see?
Did he who made the Lamb make thee?

Tyger Tyger burning bright,
In the forests of the night:
What immortal hand or eye,
Dare frame thy fearful symmetry?"""


def _gibberish() -> str:
    rng = random.Random(3)
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randrange(3, 9))) for _ in range(300)]
    return "\n".join(" ".join(words[i:i + 6]) for i in range(0, 300, 6))


SPAM = "\n".join(["BUY CHEAP PILLS NOW best price online, click here to order today!"] * 20
                 + ["Cheap pills, best price, order now and save big on every order today!"] * 10)
BOILERPLATE = "\n".join(["Home | About Us | Products | Contact | Login | Register",
                         "Copyright 2024 Example Inc. All rights reserved.",
                         "Privacy Policy | Terms of Use | Cookie Settings | Sitemap"] * 12)


def judge(text: str, preset: str) -> Doc | Rejection:
    stage = type("Stage", (), {"clean": CleanConfig(), "filters": FiltersConfig(preset=preset), "pii": PIIConfig(),
                               "dedup": None, "step_config": {}})()
    return Pipeline(build_steps(DEFAULT_STEPS, stage, sign=False)).run(Doc("d", text, "test.txt"))


@pytest.mark.parametrize("work", [HAMLET, LAMB], ids=["hamlet", "lamb"])
def test_books_keeps_a_play_and_verse_that_web_drops(work):
    kept = judge(work, "books")
    assert isinstance(kept, Doc), kept
    assert kept.preset == "books" and kept.text == work  # books edits no line away
    assert isinstance(judge(work, "web"), Rejection)


def test_books_keeps_verse_whole_that_web_cuts_to_pieces():
    assert judge(TYGER, "books").text == TYGER
    web = judge(TYGER, "web")  # C4's line rule drops every line without final punctuation
    assert isinstance(web, Rejection) or len(web.text) < len(TYGER) * 0.6


@pytest.mark.parametrize("text", [_gibberish(), SPAM, BOILERPLATE], ids=["gibberish", "spam", "boilerplate"])
def test_gibberish_spam_and_boilerplate_fail_books_and_web(text):
    for preset in ("books", "web"):
        result = judge(text, preset)
        assert isinstance(result, Rejection), (preset, text[:80])


def test_auto_chooses_a_preset_from_format_and_shape():
    assert choose_preset(HAMLET, "text", {}, "plays/hamlet.txt") == "books"
    assert choose_preset(TYGER, "jsonl", {}, "poems.jsonl") == "books"
    assert choose_preset("<p>x</p>", "html", {"format": "html"}, "page.html") == "web"
    assert choose_preset("Some page text. " * 20, "jsonl", {"url": "https://example.org"}, "cc.jsonl") == "web"
    assert choose_preset("x", "jsonl", {"kind": "docstrings"}, "builtin") == "code_docs"
    code = "Use it like this:\n\n    def f(x):\n        return x + 1\n\n>>> f(1)\n2\nThat is all."
    assert choose_preset(code, "text", {}, "doc.md") == "code_docs"
    prose = "The river runs through the old town and the bridge that crosses it was built of stone. " * 10
    assert choose_preset(prose, "jsonl", {}, "misc.jsonl") == "web"
    assert judge(HAMLET, "auto").preset == "books"


# ---------------------------------------------------------------- FineWeb, hand-computed

def _fw(**changes) -> FineWebConfig:
    # Every other rule switched off so each check isolates one comparison.
    base = {"line_punct_thr": -1.0, "short_line_thr": 2.0, "char_duplicates_ratio": 2.0, "new_line_ratio": 99.0}
    return FineWebConfig(**{**base, **changes})


def test_fineweb_line_punct_ratio_is_at_most_the_threshold():
    text = "a.\nb\nc\nd\ne\nf\ng\nh"  # 8 lines, 1 ends in punctuation: 1/8 = 0.125
    assert fineweb_filter(text, _fw(line_punct_thr=0.125)) == "fineweb:line_punct_ratio"  # 0.125 <= 0.125
    assert fineweb_filter(text, _fw(line_punct_thr=0.12)) is None
    # Empty lines are lines: "a.\n\nb." is 3 lines, 2 ending in punctuation: 2/3.
    assert fineweb_filter("a.\n\nb.", _fw(line_punct_thr=2 / 3)) == "fineweb:line_punct_ratio"
    # Only . ' " ! ? count (not a closing curly quote or an ellipsis character).
    assert fineweb_filter("a\u201d\nb\u2026", _fw(line_punct_thr=0.0)) == "fineweb:line_punct_ratio"


def test_fineweb_short_line_ratio_is_at_least_the_threshold():
    long = "x" * 31
    text = f"{long}\n\nshort"  # 3 lines: "" and "short" are <= 30 characters: 2/3
    assert fineweb_filter(text, _fw(short_line_thr=2 / 3)) == "fineweb:short_line_ratio"  # 2/3 >= 2/3
    assert fineweb_filter(text, _fw(short_line_thr=0.7)) is None
    assert fineweb_filter("x" * 30 + "\n" + long, _fw(short_line_thr=0.5)) == "fineweb:short_line_ratio"  # 30 <= 30


def test_fineweb_char_dup_ratio_counts_spaces_in_the_denominator():
    text = "the cat sat.\nthe cat sat.\na dog ran far away."  # 45 chars, 2 newlines: 43; duplicated: 12
    assert fineweb_filter(text, _fw(char_duplicates_ratio=12 / 43)) == "fineweb:char_dup_ratio"  # >= at equality
    # Without spaces the denominator would be 35 and 12/35 = 0.343 > 0.3: the reference keeps it.
    assert fineweb_filter(text, _fw(char_duplicates_ratio=0.3)) is None


def test_fineweb_list_ratio_uses_the_word_tokenizer():
    text = "one two\nthree four\nfive six."  # 2 newlines; tokens: one two three four five six . = 7
    assert fineweb_filter(text, _fw(new_line_ratio=0.28)) == "fineweb:list_ratio"  # 2/7 = 0.2857 > 0.28
    assert fineweb_filter(text, _fw(new_line_ratio=0.29)) is None  # whitespace words would give 2/6


# ---------------------------------------------------------------- the step pipeline

def test_steps_are_built_from_config_and_a_user_step_counts_its_rejections():
    spec = "pipelines.data.steps:Decontaminate"
    stage = type("Stage", (), {"clean": CleanConfig(), "filters": FiltersConfig(preset="books"), "pii": PIIConfig(),
                               "dedup": None, "step_config": {spec: {"phrases": ["mortal coil"]}}})()
    steps = build_steps([*DEFAULT_STEPS, spec], stage, sign=False)
    assert [s.name for s in steps] == [*DEFAULT_STEPS, "decontaminate"]
    rows = [make_record("hamlet", HAMLET, "plays", "plays:1"), make_record("tyger", TYGER, "poems", "poems:1")]
    out = ProcessBatch(steps, PIIConfig())(to_table(rows)).to_pylist()
    assert out[0]["reason"] == "decontaminate:contains_phrase" and "mortal coil" in out[0]["detail"]
    assert out[1]["status"] == "kept" and out[1]["preset"] == "books"
    import json

    seconds = json.loads(out[0]["step_seconds"])
    assert set(seconds) == {*DEFAULT_STEPS, "decontaminate"} and all(v >= 0 for v in seconds.values())


def test_a_bad_user_step_is_one_config_error():
    from pipelines.config import ConfigError

    stage = type("Stage", (), {"clean": CleanConfig(), "filters": FiltersConfig(), "pii": PIIConfig(),
                               "dedup": None, "step_config": {}})()
    with pytest.raises(ConfigError, match="no_such_module"):
        build_steps(["no_such_module:Step"], stage, sign=False)
    with pytest.raises(ConfigError, match="neither a built-in step"):
        build_steps(["tokenise"], stage, sign=False)


def test_an_input_given_as_path_colon_preset_judges_its_documents_by_that_preset(tmp_path):
    from pipelines.data.readers import ReadConfig, read_input_file, resolve_inputs
    from pipelines.data.stage import ReadUnit, _iter_unit

    plays = tmp_path / "plays"
    plays.mkdir()
    (plays / "hamlet.txt").write_text(HAMLET)
    (tmp_path / "odd:name.txt").write_text(LAMB)  # a colon not followed by a preset is part of the path
    presets = ("web", "books", "code_docs", "published", "auto")
    files = resolve_inputs([f"{plays}:web", str(tmp_path / "odd:name.txt")], ReadConfig(), presets=presets)
    assert [(f.source, f.preset) for f in files] == [("plays/hamlet.txt", "web"), ("odd:name.txt", "")]
    from dataclasses import asdict

    rows = list(_iter_unit(ReadUnit(files=[asdict(f) for f in files]), ReadConfig()))
    assert [r["preset"] for r in rows] == ["web", ""]
    assert list(read_input_file(files[1], ReadConfig()))[0]["text"] == LAMB
    out = ProcessBatch.from_configs(CleanConfig(), FiltersConfig(), PIIConfig())(to_table(rows)).to_pylist()
    assert out[0]["preset"] == "web" and out[0]["status"] == "dropped"  # the input's preset, not auto's books
    assert out[1]["preset"] == "books" and out[1]["status"] == "kept"   # auto chose books for the verse


def _json_docs_page() -> str:
    import json

    notes = ["The alpha backend serves the public website, so its retries are short and its timeout is strict.",
             "Batch jobs go to the beta backend, which may wait longer for a slow database before it gives up.",
             "Use gamma for internal tools; it accepts larger uploads and keeps connections open between calls.",
             "The delta backend mirrors traffic for testing, and nothing it returns is ever shown to a user."]
    parts = ["Configuring the service", "", "The service reads its settings from a JSON file; the examples below "
             "show the layouts people use most often, each followed by when to use it."]
    for i, name in enumerate(["alpha", "beta", "gamma", "delta"]):
        example = {"backend": {"name": name, "port": 8080 + i, "retry": {"count": i + 2, "delay": 0.5}}}
        parts += ["", notes[i], "", *json.dumps(example, indent=2).split("\n")]
    return "\n".join(parts)


def test_code_docs_does_not_count_repeated_bracket_lines_as_duplicate_lines():
    """Example JSON repeats lines such as "}" and "}," — not boilerplate in documentation."""
    from pipelines.data.filters import effective_filters, gopher_repetition

    page = _json_docs_page()
    assert gopher_repetition(page, effective_filters(FiltersConfig(), "code_docs").gopher_repetition) is None
    assert gopher_repetition(page, effective_filters(FiltersConfig(), "web").gopher_repetition) \
        == "gopher_repetition:dup_line_frac"
    # A repeated line with words still counts in code_docs.
    spam = "\n".join(["Click here to subscribe to our newsletter today."] * 20 + [f"line {i} of text" for i in range(20)])
    assert gopher_repetition(spam, effective_filters(FiltersConfig(), "code_docs").gopher_repetition) \
        == "gopher_repetition:dup_line_frac"
