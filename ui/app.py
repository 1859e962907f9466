"""The rating UI (Gradio): chat with a model, compare anonymous answers and vote, see the leaderboard.

It reaches models only through an OpenAI-compatible HTTP API (:mod:`ui.client`) and stores votes in
the preference store (:mod:`ui.store`). ``build_app`` returns a FastAPI app with the UI mounted at
``/ui``; ``groundup serve`` calls it inside a single Ray Serve replica (Gradio sessions are not
sticky across replicas). Standalone, against any endpoint:

    python -m ui.app --api-url http://127.0.0.1:8000/v1 --database sqlite:///prefs.db --port 7860

The rater id comes from the text box at the top, or from ``?rater=alice`` in the address. Next round shows
the comparison queue first (pairs of replies queued by ``groundup evaluate --queue``: nothing to generate),
in the order queued; pressing Next round without voting skips a queued pair.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
from typing import Any

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from ui.chat import drop_oldest_turn
from ui.client import ApiError, Completion, OpenAIClient, Sampling
from ui.compare import (
    LETTERS,
    MAX_ANSWERS,
    Comparison,
    ShownAnswer,
    build_vote,
    parse_ranking,
    plan_round,
    queued_comparison,
    rater_message,
    reveal,
    single_model_notice,
    stream_answers,
    verdict_ranking,
)
from ui.prompts import PromptDeck, load_prompt_set
from ui.ratings import LEADERBOARD_HEADERS, compute_ratings, leaderboard_png, leaderboard_rows
from ui.store import InvalidVoteError, PreferenceStore

UI_PATH = "/ui"
FLAG_CHOICES = ["unsafe or harmful", "factually wrong", "off topic", "prompt is bad"]
LEADERBOARD_BOOTSTRAP = 200


def _sampling_controls(prefix: str) -> tuple[gr.Slider, gr.Slider, gr.Slider, gr.Slider]:
    with gr.Row():
        d = DEFAULT_SAMPLING
        temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="temperature",
                                elem_id=f"{prefix}-temperature")
        top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="top_p", elem_id=f"{prefix}-top-p")
        top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="top_k (0: off)", elem_id=f"{prefix}-top-k")
        max_tokens = gr.Slider(0, 4096, value=d.max_tokens, step=1, label="max_tokens (0: server default)",
                               elem_id=f"{prefix}-max-tokens")
    return temperature, top_p, top_k, max_tokens


DEFAULT_SAMPLING = Sampling()


def _sampling(temperature: float | None, top_p: float | None, top_k: float | None,
              max_tokens: float | None) -> Sampling:
    # Controls inside a closed accordion are not rendered yet and arrive as None: use the defaults.
    d = DEFAULT_SAMPLING
    return Sampling(temperature=d.temperature if temperature is None else float(temperature),
                    top_p=d.top_p if top_p is None else float(top_p),
                    top_k=d.top_k if top_k is None else int(top_k),
                    max_tokens=d.max_tokens if max_tokens is None else int(max_tokens))


def _error_line(err: Exception) -> str:
    return f"⚠️ {rater_message(err)}"


VOTE_IDS = ("vote-a", "vote-b", "vote-tie", "vote-bad", "vote-rank")
KEYBOARD_SHORTCUTS = """
<script>
// Votes and rounds from the keyboard (A / 1, B / 2, T, X, N), except while typing in a field.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (event.target.closest && event.target.closest("input, textarea, select, [contenteditable=true]")) return;
  const target = {a: "vote-a", "1": "vote-a", b: "vote-b", "2": "vote-b", t: "vote-tie", x: "vote-bad",
                  n: "compare-next"}[event.key.toLowerCase()];
  const button = target && document.getElementById(target);
  if (button && button.offsetParent !== null && !button.disabled) {
    event.preventDefault();
    button.click();
  }
});
</script>
"""


def build_blocks(api_url: str, store: PreferenceStore, api_key: str | None = None,
                 prompts: PromptDeck | None = None) -> gr.Blocks:
    client = OpenAIClient(api_url, api_key)

    # ---- callbacks -------------------------------------------------------------------------------------
    async def load_models(request: gr.Request | None = None):
        """Fill the model pickers (and the rater id from ?rater=) when a page opens."""
        rater = gr.update()
        if request is not None and request.query_params.get("rater"):
            rater = gr.update(value=request.query_params["rater"])
        try:
            models = await client.list_models()
            status = (f"{len(models)} model(s) at `{api_url}`" if models
                      else f"⚠️ no models at `{api_url}`")
        except ApiError as err:
            models, status = [], _error_line(err)
        names = [m.id for m in models]
        versions = {m.id: m.version for m in models}
        chat_model = gr.update(choices=names, value=names[0] if names else None)
        compare = gr.update(choices=names, value=names)
        waiting = store.queue_waiting()
        queued = f"{waiting} queued comparison(s) wait for a vote: press Next round." if waiting else ""
        return rater, chat_model, compare, versions, status, "\n\n".join(
            n for n in (queued, single_model_notice(names)) if n)

    async def chat(message: str, conversation: list[dict[str, str]], model: str | None,
                   temperature: float, top_p: float, top_k: float, max_tokens: float):
        if not (message or "").strip():
            yield gr.update(), conversation, gr.update(), "type a message first"
            return
        if not model:
            yield gr.update(), conversation, gr.update(), "⚠️ choose a model"
            return
        turns = [*conversation, {"role": "user", "content": message}]
        sent, dropped = turns, 0
        sampling = _sampling(temperature, top_p, top_k, max_tokens)
        answer = Completion(model=model)
        while True:
            try:
                async for answer in client.stream_chat(model, sent, sampling):
                    yield [*turns, {"role": "assistant", "content": answer.text}], conversation, "", ""
                break
            except ApiError as err:
                shorter = drop_oldest_turn(sent) if err.code == "context_length_exceeded" else None
                if shorter is None:
                    yield turns, conversation, message, _error_line(err)
                    return
                dropped += len(sent) - len(shorter)
                sent = shorter
        done = [*turns, {"role": "assistant", "content": answer.text}]
        note = (f" — the conversation outgrew `{model}`'s context, so its {dropped} earliest message(s) were left "
                "out of this request" if dropped else "")
        turn = sum(m["role"] == "user" for m in done)
        yield done, done, "", f"`{model}` finished turn {turn}: {answer.finish_reason}{note}"

    def clear_chat():
        return [], [], ""

    vote_buttons_off = [gr.update(interactive=False)] * len(VOTE_IDS)
    vote_buttons_on = [gr.update(interactive=True)] * len(VOTE_IDS)

    def blank_answers(count: int) -> list[Any]:
        return [gr.update(value="", label=f"Answer {LETTERS[i]}", visible=i < count) for i in range(MAX_ANSWERS)]

    async def run_round(messages: list[dict[str, str]], planned: list[str], versions: dict[str, str],
                        sampling: Sampling, regenerations: int, prompt_box: Any):
        """Stream a round's answers; vote buttons stay off until every answer has finished."""
        comparison = Comparison(messages=messages, regenerations=regenerations,
                                answers=[ShownAnswer(model=m, version=(versions or {}).get(m, ""),
                                                     sampling=sampling.record()) for m in planned])

        def boxes() -> list[Any]:
            shown = [gr.update(value=f"⚠️ {a.error}" if a.error else a.content, label=f"Answer {LETTERS[i]}",
                               visible=True) for i, a in enumerate(comparison.answers)]
            return shown + [gr.update(value="", visible=False)] * (MAX_ANSWERS - len(shown))

        yield comparison, "generating…", prompt_box, *boxes(), *vote_buttons_off
        async for _ in stream_answers(client, comparison, sampling):
            yield comparison, "generating…", gr.update(), *boxes(), *vote_buttons_off
        if comparison.failed:
            yield comparison, "⚠️ an answer failed: press Regenerate", gr.update(), *boxes(), *vote_buttons_off
            return
        notice = single_model_notice([a.model for a in comparison.answers])
        status = "Which answer is better? The models are revealed after your vote."
        yield (comparison, f"{status}\n\n{notice}" if notice else status, gr.update(), *boxes(),
               *vote_buttons_on)

    async def new_round(draw: bool, prompt: str, system: str, models: list[str] | None, n_answers: float,
                        versions: dict[str, str], temperature: float, top_p: float, top_k: float,
                        max_tokens: float):
        """A round: the typed prompt (or, with ``draw``, one from the prompt set) and a fresh anonymous set
        of models, under-compared models first."""
        keep = gr.update()
        if draw and prompts is not None:
            messages = prompts.draw()
            prompt_box = gr.update(value=messages[-1]["content"])
        else:
            if not (prompt or "").strip():
                hint = "type a prompt first" if not draw else "type a prompt (no prompt set is loaded)"
                yield None, f"⚠️ {hint}", keep, *blank_answers(int(n_answers)), *vote_buttons_off
                return
            messages, prompt_box = [{"role": "user", "content": prompt}], keep
        if (system or "").strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        try:
            planned = plan_round(list(models or []), int(n_answers), store.comparison_counts(), random.Random())
        except ValueError as err:
            yield None, _error_line(err), keep, *blank_answers(int(n_answers)), *vote_buttons_off
            return
        async for update in run_round(messages, planned, versions, _sampling(temperature, top_p, top_k, max_tokens),
                                      0, prompt_box):
            yield update

    async def typed_round(*args):
        async for update in new_round(False, *args):
            yield update

    def queued_round(current: Comparison | None, rater: str):
        """The next queued comparison, if any (an unvoted queued one on screen is skipped first)."""
        if current is not None and current.queue_entry is not None and current.vote_uid is None:
            store.skip_queued(current.queue_entry, (rater or "").strip())
        entry = store.next_queued()
        if entry is None:
            return None
        comparison = queued_comparison(entry)
        waiting = store.queue_waiting()
        boxes = [gr.update(value=a.content, label=f"Answer {LETTERS[i]}", visible=True)
                 for i, a in enumerate(comparison.answers)]
        boxes += [gr.update(value="", visible=False)] * (MAX_ANSWERS - len(boxes))
        status = (f"Queued comparison ({waiting} waiting, from `{entry.batch}`): which answer is better? The models "
                  "are revealed after your vote; Next round skips it.")
        return (comparison, status, gr.update(value=comparison.messages[-1]["content"]), *boxes,
                *vote_buttons_on)

    async def drawn_round(current: Comparison | None, rater: str, *args):
        queued = queued_round(current, rater)
        if queued is not None:
            yield queued
            return
        async for update in new_round(True, *args):
            yield update

    async def regenerate(comparison: Comparison | None, versions, temperature, top_p, top_k, max_tokens):
        if comparison is None:
            yield None, "⚠️ nothing to regenerate: start a round first", gr.update(), \
                *[gr.update()] * MAX_ANSWERS, *vote_buttons_off
            return
        if comparison.queue_entry is not None:
            yield comparison, "⚠️ a queued comparison's answers are fixed: vote, or press Next round to skip it", \
                gr.update(), *[gr.update()] * MAX_ANSWERS, *[gr.update()] * len(VOTE_IDS)
            return
        planned = [a.model for a in comparison.answers]
        random.shuffle(planned)
        async for update in run_round(comparison.messages, planned, versions,
                                      _sampling(temperature, top_p, top_k, max_tokens),
                                      comparison.regenerations + 1, gr.update()):
            yield update

    def record(comparison: Comparison | None, rater: str, flags: list[str], outcome: str,
               ranking: list[list[int]]):
        vote = build_vote(comparison, rater, outcome, ranking, flags or [])
        stored = store.add_vote(vote)
        comparison.vote_uid = stored.uid
        labels = [gr.update(label=f"Answer {LETTERS[i]} — {a.model}")
                  for i, a in enumerate(comparison.answers)]
        labels += [gr.update()] * (MAX_ANSWERS - len(labels))
        notice = single_model_notice([a.model for a in comparison.answers])
        return (comparison, f"✅ vote saved (`{stored.uid[:8]}`)\n\n{reveal(comparison)}\n\n"
                f"{notice + chr(10) * 2 if notice else ''}Press Next round (N) for another.",
                gr.update(), *labels, *vote_buttons_off)

    def refused(comparison, err: Exception):
        return comparison, _error_line(err), gr.update(), *[gr.update()] * MAX_ANSWERS, *[gr.update()] * len(VOTE_IDS)

    def vote(verdict: str):
        def handler(comparison: Comparison | None, rater: str, flags: list[str]):
            try:
                if comparison is None:
                    raise ValueError("start a round first: press Next round, or type a prompt and press Generate")
                outcome, ranking = verdict_ranking(verdict, len(comparison.answers))
                return record(comparison, rater, flags, outcome, ranking)
            except (ValueError, InvalidVoteError) as err:
                return refused(comparison, err)
        return handler

    def vote_ranking(comparison: Comparison | None, rater: str, flags: list[str], ranking_text: str):
        try:
            if comparison is None:
                raise ValueError("start a round first: press Next round, or type a prompt and press Generate")
            ranking = parse_ranking(ranking_text, len(comparison.answers))
            return record(comparison, rater, flags, "ranked", ranking)
        except (ValueError, InvalidVoteError) as err:
            return refused(comparison, err)

    def leaderboard():
        from PIL import Image

        votes = store.votes()
        board = compute_ratings(votes, bootstrap=LEADERBOARD_BOOTSTRAP, seed=0)
        raters = len({v.rater for v in votes})
        if not board:
            why = ("Ratings need votes that compare answers of two different models; "
                   + (f"the {len(votes)} vote(s) so far compared samples of one model or called every answer bad."
                      if votes else "there are no votes yet."))
            return gr.update(value=[]), gr.update(value=None, visible=False), f"No model is rated yet. {why}"
        summary = f"{len(votes)} vote(s) from {raters} rater(s); {len(board)} model(s) rated."
        image = Image.open(io.BytesIO(leaderboard_png(board)))
        return leaderboard_rows(board), gr.update(value=image, visible=True), summary

    # ---- layout --------------------------------------------------------------------------------------------
    with gr.Blocks(title="groundup — chat, compare, rate") as blocks:
        versions = gr.State({})
        comparison = gr.State(None)
        conversation = gr.State([])
        with gr.Row():
            gr.Markdown("## groundup: chat, compare and rate")
            rater = gr.Textbox(label="rater id", placeholder="your name or id", elem_id="rater", scale=0,
                               min_width=220)
        api_status = gr.Markdown("", elem_id="api-status")

        with gr.Tab("Chat", elem_id="tab-chat"):
            with gr.Row():
                chat_model = gr.Dropdown(label="model", choices=[], elem_id="chat-model", scale=3)
                refresh = gr.Button("refresh models", elem_id="refresh-models", scale=0)
            chat_controls = _sampling_controls("chat")
            # Model output is shown as plain text: no Markdown headings or links from an untrained model.
            chatbot = gr.Chatbot(label="conversation", elem_id="chat-history", height=420, render_markdown=False)
            with gr.Row():
                chat_input = gr.Textbox(label="message", placeholder="Say something…", elem_id="chat-input",
                                        scale=4)
                send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=0)
                clear = gr.Button("Clear", elem_id="chat-clear", scale=0)
            chat_status = gr.Markdown("", elem_id="chat-status")

        with gr.Tab("Compare", elem_id="tab-compare"):
            compare_notice = gr.Markdown("", elem_id="compare-notice")
            with gr.Row():
                compare_models = gr.Dropdown(label="models in the rounds (pairs favour the least compared)",
                                             choices=[], multiselect=True, elem_id="compare-models", scale=3)
                n_answers = gr.Slider(2, MAX_ANSWERS, value=2, step=1, label="answers", elem_id="compare-n",
                                      scale=1)
            with gr.Accordion("system prompt and sampling", open=False):
                system = gr.Textbox(label="system prompt (optional)", elem_id="compare-system")
                compare_controls = _sampling_controls("compare")
            prompt_help = ("prompt: type one and press Generate" +
                           (", or press Next round to draw one from the prompt set" if prompts else ""))
            prompt = gr.Textbox(label=prompt_help, lines=3, elem_id="compare-prompt")
            with gr.Row():
                next_button = gr.Button("Next round  [N]", variant="primary", elem_id="compare-next")
                generate_button = gr.Button("Generate", elem_id="compare-generate")
                regenerate_button = gr.Button("Regenerate", elem_id="compare-regenerate")
            with gr.Row(equal_height=True):
                answers = [gr.Textbox(label=f"Answer {LETTERS[i]}", lines=10, max_lines=30, interactive=False,
                                      visible=i < 2, elem_id=f"compare-answer-{LETTERS[i].lower()}")
                           for i in range(MAX_ANSWERS)]
            with gr.Row():
                vote_a = gr.Button("A is better  [A]", elem_id="vote-a", interactive=False)
                vote_b = gr.Button("B is better  [B]", elem_id="vote-b", interactive=False)
                vote_tie = gr.Button("Tie  [T]", elem_id="vote-tie", interactive=False)
                vote_bad = gr.Button("All bad  [X]", elem_id="vote-bad", interactive=False)
            with gr.Row():
                ranking_text = gr.Textbox(label="or rank them (more than two answers): e.g. B > A = C",
                                          elem_id="compare-ranking", scale=3)
                vote_rank = gr.Button("Submit ranking", elem_id="vote-rank", scale=1, interactive=False)
            flags = gr.CheckboxGroup(FLAG_CHOICES, label="flags (optional)", elem_id="compare-flags")
            compare_status = gr.Markdown("", elem_id="compare-status")

        with gr.Tab("Leaderboard", elem_id="tab-leaderboard") as leaderboard_tab:
            refresh_board = gr.Button("Refresh", elem_id="leaderboard-refresh")
            board_summary = gr.Markdown("", elem_id="leaderboard-summary")
            board_table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False,
                                       elem_id="leaderboard-table")
            board_plot = gr.Image(label="ratings with 95% bootstrap intervals", type="pil", interactive=False,
                                  elem_id="leaderboard-plot", visible=False)

        # ---- events ------------------------------------------------------------------------------------
        model_outputs = [rater, chat_model, compare_models, versions, api_status, compare_notice]
        blocks.load(load_models, None, model_outputs)
        refresh.click(load_models, None, model_outputs)

        chat_inputs = [chat_input, conversation, chat_model, *chat_controls]
        chat_outputs = [chatbot, conversation, chat_input, chat_status]
        send.click(chat, chat_inputs, chat_outputs)
        chat_input.submit(chat, chat_inputs, chat_outputs)
        clear.click(clear_chat, None, [chatbot, conversation, chat_status])

        vote_controls = [vote_a, vote_b, vote_tie, vote_bad, vote_rank]
        compare_outputs = [comparison, compare_status, prompt, *answers, *vote_controls]
        round_inputs = [prompt, system, compare_models, n_answers, versions, *compare_controls]
        # api_name: the events as an HTTP API too (gradio_client), e.g. /next_round then /vote_a.
        next_button.click(drawn_round, [comparison, rater, *round_inputs], compare_outputs, api_name="next_round")
        generate_button.click(typed_round, round_inputs, compare_outputs, api_name="generate")
        regenerate_button.click(regenerate, [comparison, versions, *compare_controls], compare_outputs,
                                api_name="regenerate")
        for button, verdict in ((vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "bad")):
            button.click(vote(verdict), [comparison, rater, flags], compare_outputs, api_name=f"vote_{verdict}")
        vote_rank.click(vote_ranking, [comparison, rater, flags, ranking_text], compare_outputs,
                        api_name="vote_ranking")

        board_outputs = [board_table, board_plot, board_summary]
        refresh_board.click(leaderboard, None, board_outputs)
        leaderboard_tab.select(leaderboard, None, board_outputs)

    blocks.queue(default_concurrency_limit=32)  # many raters at once; generation is I/O-bound here
    return blocks


def build_app(api_url: str, database_url: str, api_key: str | None = None, path: str = UI_PATH,
              prompts: str | None = None) -> FastAPI:
    """A FastAPI app with the UI mounted at ``path``: what a Serve replica or uvicorn runs. ``prompts``: a
    prompt set file the rounds draw from (see :mod:`ui.prompts`)."""
    store = PreferenceStore(database_url)
    deck = PromptDeck(load_prompt_set(prompts)) if prompts else None
    app = FastAPI(title="groundup UI")

    @app.get("/", include_in_schema=False)
    def to_ui() -> RedirectResponse:
        return RedirectResponse(url=f"{path}/")

    return gr.mount_gradio_app(app, build_blocks(api_url, store, api_key, deck), path=path, head=KEYBOARD_SHORTCUTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.app",
                                     description="the groundup rating UI, standalone")
    parser.add_argument("--api-url", required=True,
                        help="OpenAI-compatible API base, e.g. http://host:8000/v1")
    parser.add_argument("--database", default="sqlite:///preferences.db",
                        help="SQLAlchemy URL or SQLite file")
    parser.add_argument("--api-key", default=os.environ.get("GROUNDUP_API_KEY"),
                        help="Bearer key for the API (default: $GROUNDUP_API_KEY)")
    parser.add_argument("--prompts", default=None, help="a prompt set for the rounds (.txt or .jsonl)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)

    import uvicorn

    from pipelines.config import ConfigError

    try:
        app = build_app(args.api_url, args.database, args.api_key, prompts=args.prompts)
    except (ConfigError, ValueError) as err:
        print(f"python -m ui.app: error: {err}", file=sys.stderr)
        return 2
    print(f"rating UI at http://{args.host}:{args.port}{UI_PATH}/ (models from {args.api_url})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

