"""The rating UI in a real browser (Debian's Chromium via Playwright), served by `groundup serve`'s
deployment (the shared ``serving_app`` fixture): chat with a model, vote in Compare, and find that
vote in the preference store."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.ray]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 180_000  # untrained tiny models on a busy CPU: generous, and never asserted on
ROUND_PROMPTS = ["Name a river.", "What is a prime number?", "Describe the sea."]


def as_shown(text: str) -> str:
    """A textarea's value normalises line breaks (HTML: CR and CRLF become LF); the store keeps the model's own text."""
    return re.sub(r"\r\n?", "\n", text)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def ui(serving_app):
    if not serving_app.ui_url:
        pytest.fail("groundup serve did not deploy the UI (is ui/app.py importable?)")
    return serving_app


def test_chat_then_vote_in_compare_and_read_the_vote_back(ui, page):
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    from ui.store import PreferenceStore

    page.goto(f"{ui.ui_url}?rater=browser-alice")
    expect(page.locator("#api-status")).to_contain_text("2 model(s)")
    expect(page.locator("#rater input, #rater textarea").first).to_have_value("browser-alice")

    # Chat: one streamed turn with a model picked from /v1/models.
    page.locator("#chat-input textarea").fill("# Hello there")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-status")).to_contain_text("finished turn 1")
    history = page.locator("#chat-history")
    expect(history).to_contain_text("# Hello there")  # shown as typed: plain text, no Markdown heading
    assert history.locator("h1").count() == 0
    assert page.locator("#chat-input textarea").input_value() == ""
    # Two long turns outgrow the small model's context: the oldest turns are left out, and the chat says so.
    long_message = " ".join(["the river flows"] * 15)  # about 110 tokens of a 256-token context
    for turn in (2, 3):
        page.locator("#chat-input textarea").fill(long_message)
        page.locator("#chat-send").click()
        expect(page.locator("#chat-status")).to_contain_text(f"finished turn {turn}")
    expect(page.locator("#chat-status")).to_contain_text("earliest message(s) were left out")
    expect(history).to_contain_text("Hello there")  # still shown to the rater

    # Before any vote the leaderboard says why nothing is rated (no empty table, no broken image).
    if PreferenceStore(ui.config.resolved_database_url()).count() == 0:
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.locator("#leaderboard-summary")).to_contain_text("No model is rated yet")
        expect(page.locator("#leaderboard-plot")).to_be_hidden()

    # Compare: two anonymous answers, one vote, then the models are revealed.
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#vote-a")).to_be_disabled()  # nothing to vote on yet
    page.locator("#compare-prompt textarea").fill("Tell me a story.")
    page.locator("#compare-generate").click()
    expect(page.locator("#compare-status")).to_contain_text("Which answer is better")
    expect(page.locator("#vote-a")).to_be_enabled()
    shown = [page.locator(f"#compare-answer-{x} textarea").input_value() for x in "ab"]
    page.locator("#vote-a").click()
    status = page.locator("#compare-status")
    expect(status).to_contain_text("vote saved")
    expect(status).to_contain_text("Answer A")
    uid_prefix = re.search(r"vote saved \((\w+)\)", status.inner_text()).group(1)

    store = PreferenceStore(ui.config.resolved_database_url(), create=False)
    votes = store.votes(rater="browser-alice")
    assert len(votes) == 1
    vote = votes[0]
    assert vote.uid.startswith(uid_prefix)
    assert vote.outcome == "ranked" and vote.ranking == [[0], [1]]
    assert [m.model_dump() for m in vote.messages] == [{"role": "user", "content": "Tell me a story."}]
    assert [as_shown(c.content) for c in vote.candidates] == shown
    assert {c.model for c in vote.candidates} <= set(ui.models)
    assert all(c.finish_reason in ("stop", "length") for c in vote.candidates)
    assert all(c.sampling["max_tokens"] is None and c.sampling["temperature"] == 0.8 for c in vote.candidates)
    revealed = status.inner_text()
    for letter, candidate in zip("AB", vote.candidates):
        assert f"Answer {letter}: {candidate.model}" in revealed.replace("`", "")

    # A comparison takes one vote: the buttons are off until the next round.
    for button in ("#vote-a", "#vote-b", "#vote-tie", "#vote-bad"):
        expect(page.locator(button)).to_be_disabled()
    assert len(store.votes(rater="browser-alice")) == 1

    # The leaderboard counts the vote.
    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).to_contain_text("vote(s)")
    if len({c.model for c in vote.candidates}) == 2:  # one model against itself rates nothing
        expect(page.locator("#leaderboard-table")).to_contain_text(vote.candidates[0].model)


@pytest.fixture(scope="module")
def standalone_ui(serving_app, tmp_path_factory):
    """`python -m ui.app` as its own process (uvicorn), pointed at the served API like any client."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tmp_path_factory.mktemp("standalone-ui")
    database = folder / "prefs.db"
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ROUND_PROMPTS) + "\n")
    process = subprocess.Popen([sys.executable, "-m", "ui.app", "--api-url", serving_app.api_url,
                                "--database", f"sqlite:///{database}", "--port", str(port),
                                "--prompts", str(folder / "prompts.jsonl")])
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "python -m ui.app exited early"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ui/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "python -m ui.app did not come up"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", f"sqlite:///{database}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_standalone_ui_ranks_three_answers_regenerates_and_rejects_bad_input(standalone_ui, page):
    import httpx
    from playwright.sync_api import expect

    from ui.store import PreferenceStore

    expect.set_options(timeout=WAIT_MS)
    base_url, database_url = standalone_ui
    redirect = httpx.get(f"{base_url}/", follow_redirects=False)
    assert redirect.status_code in (302, 307) and redirect.headers["location"] == "/ui/"

    page.goto(f"{base_url}/ui/")
    expect(page.locator("#api-status")).to_contain_text("2 model(s)")
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-n input[type=number]").fill("3")
    page.locator("#compare-n input[type=number]").press("Enter")
    page.locator("#compare-prompt textarea").fill("Name three rivers.")
    page.locator("#compare-generate").click()
    status = page.locator("#compare-status")
    expect(status).to_contain_text("Which answer is better")
    expect(page.locator("#compare-answer-c")).to_be_visible()
    shown = [page.locator(f"#compare-answer-{x} textarea").input_value() for x in "abc"]

    # No rater id yet, then a ranking that leaves an answer out: one clear line each, nothing stored.
    page.locator("#compare-ranking textarea, #compare-ranking input").first.fill("C > A = B")
    page.locator("#vote-rank").click()
    expect(status).to_contain_text("rater")
    page.locator("#rater input, #rater textarea").first.fill("browser-bob")
    page.locator("#vote-a").click()
    expect(status).to_contain_text("type a ranking such as")
    page.locator("#compare-ranking textarea, #compare-ranking input").first.fill("C > A")
    page.locator("#vote-rank").click()
    expect(status).to_contain_text("candidate 1 is missing")
    store = PreferenceStore(database_url, create=False)
    assert store.count() == 0

    page.locator("#compare-ranking textarea, #compare-ranking input").first.fill("C > A = B")
    page.locator("#vote-rank").click()
    expect(status).to_contain_text("vote saved")
    ranked = store.votes(rater="browser-bob")
    assert len(ranked) == 1 and ranked[0].ranking == [[2], [0, 1]]
    assert [as_shown(c.content) for c in ranked[0].candidates] == shown
    assert {c.model for c in ranked[0].candidates} == {"tiny", "tiny-2"}  # 3 answers from 2 models

    # Regenerate the same prompt, flag it and call every answer bad.
    page.locator("#compare-regenerate").click()
    expect(status).to_contain_text("Which answer is better")
    page.get_by_label("off topic").check()
    page.locator("#vote-bad").click()
    expect(status).to_contain_text("vote saved")
    votes = store.votes(rater="browser-bob")
    assert len(votes) == 2
    bad = votes[1]
    assert bad.outcome == "not_rankable" and bad.ranking == []
    assert bad.flags == ["off topic", "regenerated"]
    assert [m.model_dump() for m in bad.messages] == [{"role": "user", "content": "Name three rivers."}]


def test_rounds_with_prompts_from_the_set_and_keyboard_votes(standalone_ui, page):
    """Two arena rounds driven by the keyboard: N draws a prompt from the operator's set and a fresh pair of
    different models, votes wait until both answers are done, A / B vote; the leaderboard rates both models."""
    from playwright.sync_api import expect

    from ui.store import PreferenceStore

    expect.set_options(timeout=WAIT_MS)
    base_url, database_url = standalone_ui
    page.goto(f"{base_url}/ui/?rater=keyboard-kim")
    expect(page.locator("#api-status")).to_contain_text("2 model(s)")
    store = PreferenceStore(database_url, create=False)
    page.get_by_role("tab", name="Compare").click()
    status = page.locator("#compare-status")
    prompts = []
    for key in ("a", "b"):
        page.locator("body").press("n")
        expect(status).to_contain_text("Which answer is better")
        prompt = page.locator("#compare-prompt textarea").input_value()
        assert prompt in ROUND_PROMPTS and prompt not in prompts  # every prompt of the set before repeats
        prompts.append(prompt)
        page.locator("body").press(key)
        expect(status).to_contain_text("vote saved")
        expect(page.locator("#vote-a")).to_be_disabled()
    votes = store.votes(rater="keyboard-kim")
    assert [v.ranking for v in votes] == [[[0], [1]], [[1], [0]]]
    assert [v.messages[-1].content for v in votes] == prompts
    assert all({c.model for c in v.candidates} == {"tiny", "tiny-2"} for v in votes)  # two different models
    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).to_contain_text("2 model(s) rated")
    expect(page.locator("#leaderboard-plot")).to_be_visible()
