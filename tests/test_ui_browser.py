"""The rating UI in a real browser (Debian's Chromium via Playwright), served by `groundup serve`'s
deployment (the shared ``serving_app`` fixture): chat with a model, vote in Compare, and find that
vote in the preference store."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.ray]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 180_000  # untrained tiny models on a busy CPU: generous, and never asserted on


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
    page.locator("#chat-input textarea").fill("Hello there")
    page.locator("#chat-send").click()
    expect(page.locator("#chat-status")).to_contain_text("finished")
    history = page.locator("#chat-history")
    expect(history).to_contain_text("Hello there")
    assert page.locator("#chat-input textarea").input_value() == ""

    # Compare: two anonymous answers, one vote, then the models are revealed.
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-prompt textarea").fill("Tell me a story.")
    page.locator("#compare-generate").click()
    expect(page.locator("#compare-status")).to_contain_text("Which answer is better")
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
    assert [c.content for c in vote.candidates] == shown
    assert {c.model for c in vote.candidates} <= set(ui.models)
    assert all(c.finish_reason in ("stop", "length") for c in vote.candidates)
    assert all(c.sampling["max_tokens"] is None and c.sampling["temperature"] == 0.8 for c in vote.candidates)
    revealed = status.inner_text()
    for letter, candidate in zip("AB", vote.candidates):
        assert f"Answer {letter}: {candidate.model}" in revealed.replace("`", "")

    # A second vote on the same comparison is refused, not stored twice.
    page.locator("#vote-b").click()
    expect(status).to_contain_text("already has your vote")
    assert len(store.votes(rater="browser-alice")) == 1

    # The leaderboard counts the vote.
    page.get_by_role("tab", name="Leaderboard").click()
    expect(page.locator("#leaderboard-summary")).to_contain_text("vote(s)")
