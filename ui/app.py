"""The rating UI (Gradio): chat with a model, compare anonymous answers and vote, see the leaderboard.

It reaches models only through an OpenAI-compatible HTTP API (:mod:`ui.client`) and stores votes in
the preference store (:mod:`ui.store`). ``build_app`` returns a FastAPI app with the UI mounted at
``/ui``; ``groundup serve`` calls it inside a single Ray Serve replica (Gradio sessions are not
sticky across replicas). Standalone, against any endpoint:

    python -m ui.app --api-url http://127.0.0.1:8000/v1 --database sqlite:///prefs.db --port 7860

The rater id comes from the text box at the top, or from ``?rater=alice`` in the address.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
from typing import Any, AsyncIterator

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from ui.client import ApiError, Completion, OpenAIClient, Sampling
from ui.compare import (LETTERS, MAX_ANSWERS, Comparison, ShownAnswer, build_vote, parse_ranking, plan_models,
                        reveal, verdict_ranking)
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
    return f"⚠️ {str(err).splitlines()[0] if str(err) else type(err).__name__}"


async def _stream_answers(client: OpenAIClient, comparison: Comparison,
                          sampling: Sampling) -> AsyncIterator[None]:
    """Generate every answer of a comparison concurrently; yields after each streamed chunk."""
    updates: asyncio.Queue[bool] = asyncio.Queue()

    async def pump(answer: ShownAnswer) -> None:
        try:
            stream = client.stream_chat(answer.model, comparison.messages, sampling, answer.version)
            async for partial in stream:
                answer.content, answer.finish_reason = partial.text, partial.finish_reason
                await updates.put(False)
        except ApiError as err:
            answer.error, answer.finish_reason = str(err), "error"
        finally:
            await updates.put(True)

    tasks = [asyncio.create_task(pump(a)) for a in comparison.answers]
    try:
        finished = 0
        while finished < len(tasks):
            finished += await updates.get()
            yield None
    finally:
        for task in tasks:
            task.cancel()


def build_blocks(api_url: str, store: PreferenceStore, api_key: str | None = None) -> gr.Blocks:
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
        compare = gr.update(choices=names, value=names[:2])
        return rater, chat_model, compare, versions, status

    async def chat(message: str, conversation: list[dict[str, str]], model: str | None,
                   temperature: float, top_p: float, top_k: float, max_tokens: float):
        if not (message or "").strip():
            yield gr.update(), conversation, gr.update(), "type a message first"
            return
        if not model:
            yield gr.update(), conversation, gr.update(), "⚠️ choose a model"
            return
        turns = [*conversation, {"role": "user", "content": message}]
        sampling = _sampling(temperature, top_p, top_k, max_tokens)
        answer = Completion(model=model)
        try:
            async for answer in client.stream_chat(model, turns, sampling):
                yield [*turns, {"role": "assistant", "content": answer.text}], conversation, "", ""
        except ApiError as err:
            yield turns, conversation, message, _error_line(err)
            return
        done = [*turns, {"role": "assistant", "content": answer.text}]
        yield done, done, "", f"`{model}` finished: {answer.finish_reason}"

    def clear_chat():
        return [], [], ""

    async def generate(prompt: str, system: str, models: list[str] | None, n_answers: float,
                       versions: dict[str, str], temperature: float, top_p: float, top_k: float,
                       max_tokens: float, previous: Comparison | None = None):
        """Start a comparison (or, with ``previous``, sample its prompt again) and stream the answers."""
        hidden = [gr.update(value="", label=f"Answer {LETTERS[i]}", visible=i < int(n_answers))
                  for i in range(MAX_ANSWERS)]
        if previous is not None:
            messages = previous.messages
        else:
            if not (prompt or "").strip():
                yield None, "⚠️ type a prompt first", *hidden
                return
            messages = [{"role": "system", "content": system}] if (system or "").strip() else []
            messages.append({"role": "user", "content": prompt})
        sampling = _sampling(temperature, top_p, top_k, max_tokens)
        try:
            planned = plan_models(list(models or []), int(n_answers), random.Random())
        except ValueError as err:
            yield previous, _error_line(err), *hidden
            return
        regenerations = previous.regenerations + 1 if previous else 0
        comparison = Comparison(messages=messages, regenerations=regenerations,
                                answers=[ShownAnswer(model=m, version=(versions or {}).get(m, ""),
                                                     sampling=sampling.record())
                                         for m in planned])

        def boxes() -> list[Any]:
            shown = [gr.update(value=_error_line(ApiError(a.error)) if a.error else a.content,
                               label=f"Answer {LETTERS[i]}", visible=True)
                     for i, a in enumerate(comparison.answers)]
            return shown + [gr.update(value="", visible=False)] * (MAX_ANSWERS - len(shown))

        yield comparison, "generating…", *boxes()
        async for _ in _stream_answers(client, comparison, sampling):
            yield comparison, "generating…", *boxes()
        status = ("⚠️ an answer failed: regenerate" if comparison.failed
                  else "Which answer is better? The models are revealed after your vote.")
        yield comparison, status, *boxes()

    async def regenerate(comparison: Comparison | None, models, n_answers, versions,
                         temperature, top_p, top_k, max_tokens):
        if comparison is None:
            yield None, "⚠️ nothing to regenerate: generate first", *[gr.update()] * MAX_ANSWERS
            return
        async for update in generate("", "", models, n_answers, versions, temperature, top_p, top_k,
                                     max_tokens, previous=comparison):
            yield update

    def record(comparison: Comparison | None, rater: str, flags: list[str], outcome: str,
               ranking: list[list[int]]):
        vote = build_vote(comparison, rater, outcome, ranking, flags or [])
        stored = store.add_vote(vote)
        comparison.vote_uid = stored.uid
        labels = [gr.update(label=f"Answer {LETTERS[i]} — {a.model}")
                  for i, a in enumerate(comparison.answers)]
        labels += [gr.update()] * (MAX_ANSWERS - len(labels))
        return comparison, f"✅ vote saved (`{stored.uid[:8]}`)\n\n{reveal(comparison)}", *labels

    def vote(verdict: str):
        def handler(comparison: Comparison | None, rater: str, flags: list[str]):
            try:
                if comparison is None:
                    raise ValueError("generate answers first")
                outcome, ranking = verdict_ranking(verdict, len(comparison.answers))
                return record(comparison, rater, flags, outcome, ranking)
            except (ValueError, InvalidVoteError) as err:
                return comparison, _error_line(err), *[gr.update()] * MAX_ANSWERS
        return handler

    def vote_ranking(comparison: Comparison | None, rater: str, flags: list[str], ranking_text: str):
        try:
            if comparison is None:
                raise ValueError("generate answers first")
            ranking = parse_ranking(ranking_text, len(comparison.answers))
            return record(comparison, rater, flags, "ranked", ranking)
        except (ValueError, InvalidVoteError) as err:
            return comparison, _error_line(err), *[gr.update()] * MAX_ANSWERS

    def leaderboard():
        from PIL import Image

        votes = store.votes()
        board = compute_ratings(votes, bootstrap=LEADERBOARD_BOOTSTRAP, seed=0)
        raters = len({v.rater for v in votes})
        summary = f"{len(votes)} vote(s) from {raters} rater(s); {len(board)} model(s) rated."
        image = Image.open(io.BytesIO(leaderboard_png(board))) if board else None
        return leaderboard_rows(board), image, summary

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
            chatbot = gr.Chatbot(label="conversation", elem_id="chat-history", height=420)
            with gr.Row():
                chat_input = gr.Textbox(label="message", placeholder="Say something…", elem_id="chat-input",
                                        scale=4)
                send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=0)
                clear = gr.Button("Clear", elem_id="chat-clear", scale=0)
            chat_status = gr.Markdown("", elem_id="chat-status")

        with gr.Tab("Compare", elem_id="tab-compare"):
            with gr.Row():
                compare_models = gr.Dropdown(label="models (one model twice = two samples of it)", choices=[],
                                             multiselect=True, elem_id="compare-models", scale=3)
                n_answers = gr.Slider(2, MAX_ANSWERS, value=2, step=1, label="answers", elem_id="compare-n",
                                      scale=1)
            with gr.Accordion("system prompt and sampling", open=False):
                system = gr.Textbox(label="system prompt (optional)", elem_id="compare-system")
                compare_controls = _sampling_controls("compare")
            prompt = gr.Textbox(label="prompt", lines=3, elem_id="compare-prompt")
            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="compare-generate")
                regenerate_button = gr.Button("Regenerate", elem_id="compare-regenerate")
            with gr.Row(equal_height=True):
                answers = [gr.Textbox(label=f"Answer {LETTERS[i]}", lines=10, max_lines=30, interactive=False,
                                      visible=i < 2, elem_id=f"compare-answer-{LETTERS[i].lower()}")
                           for i in range(MAX_ANSWERS)]
            with gr.Row():
                vote_a = gr.Button("A is better", elem_id="vote-a")
                vote_b = gr.Button("B is better", elem_id="vote-b")
                vote_tie = gr.Button("Tie", elem_id="vote-tie")
                vote_bad = gr.Button("All bad", elem_id="vote-bad")
            with gr.Row():
                ranking_text = gr.Textbox(label="or rank them (more than two answers): e.g. B > A = C",
                                          elem_id="compare-ranking", scale=3)
                vote_rank = gr.Button("Submit ranking", elem_id="vote-rank", scale=1)
            flags = gr.CheckboxGroup(FLAG_CHOICES, label="flags (optional)", elem_id="compare-flags")
            compare_status = gr.Markdown("", elem_id="compare-status")

        with gr.Tab("Leaderboard", elem_id="tab-leaderboard") as leaderboard_tab:
            refresh_board = gr.Button("Refresh", elem_id="leaderboard-refresh")
            board_summary = gr.Markdown("", elem_id="leaderboard-summary")
            board_table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False,
                                       elem_id="leaderboard-table")
            board_plot = gr.Image(label="ratings with 95% bootstrap intervals", type="pil", interactive=False,
                                  elem_id="leaderboard-plot")

        # ---- events ------------------------------------------------------------------------------------
        model_outputs = [rater, chat_model, compare_models, versions, api_status]
        blocks.load(load_models, None, model_outputs)
        refresh.click(load_models, None, model_outputs)

        chat_inputs = [chat_input, conversation, chat_model, *chat_controls]
        chat_outputs = [chatbot, conversation, chat_input, chat_status]
        send.click(chat, chat_inputs, chat_outputs)
        chat_input.submit(chat, chat_inputs, chat_outputs)
        clear.click(clear_chat, None, [chatbot, conversation, chat_status])

        compare_outputs = [comparison, compare_status, *answers]
        generate_button.click(generate, [prompt, system, compare_models, n_answers, versions,
                                         *compare_controls], compare_outputs)
        regenerate_button.click(regenerate, [comparison, compare_models, n_answers, versions,
                                             *compare_controls], compare_outputs)
        for button, verdict in ((vote_a, "a"), (vote_b, "b"), (vote_tie, "tie"), (vote_bad, "bad")):
            button.click(vote(verdict), [comparison, rater, flags], compare_outputs)
        vote_rank.click(vote_ranking, [comparison, rater, flags, ranking_text], compare_outputs)

        board_outputs = [board_table, board_plot, board_summary]
        refresh_board.click(leaderboard, None, board_outputs)
        leaderboard_tab.select(leaderboard, None, board_outputs)

    blocks.queue(default_concurrency_limit=32)  # many raters at once; generation is I/O-bound here
    return blocks


def build_app(api_url: str, database_url: str, api_key: str | None = None, path: str = UI_PATH) -> FastAPI:
    """A FastAPI app with the UI mounted at ``path``: what a Serve replica or uvicorn runs."""
    store = PreferenceStore(database_url)
    app = FastAPI(title="groundup UI")

    @app.get("/", include_in_schema=False)
    def to_ui() -> RedirectResponse:
        return RedirectResponse(url=f"{path}/")

    return gr.mount_gradio_app(app, build_blocks(api_url, store, api_key), path=path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.app",
                                     description="the groundup rating UI, standalone")
    parser.add_argument("--api-url", required=True,
                        help="OpenAI-compatible API base, e.g. http://host:8000/v1")
    parser.add_argument("--database", default="sqlite:///preferences.db",
                        help="SQLAlchemy URL or SQLite file")
    parser.add_argument("--api-key", default=os.environ.get("GROUNDUP_API_KEY"),
                        help="Bearer key for the API (default: $GROUNDUP_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)

    import uvicorn

    from pipelines.config import ConfigError

    try:
        app = build_app(args.api_url, args.database, args.api_key)
    except ConfigError as err:
        print(f"python -m ui.app: error: {err}", file=sys.stderr)
        return 2
    print(f"rating UI at http://{args.host}:{args.port}{UI_PATH}/ (models from {args.api_url})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

