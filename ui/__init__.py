"""The rating UI and the preference data it collects.

- :mod:`ui.app`: the Gradio app (Chat, Compare, Leaderboard); ``build_app`` for a Serve replica,
  ``python -m ui.app`` standalone against any OpenAI-compatible endpoint.
- :mod:`ui.client`: the only way the UI reaches models: the OpenAI HTTP API.
- :mod:`ui.store`: votes in a SQL database (SQLAlchemy; SQLite in WAL mode by default).
- :mod:`ui.export`: ``groundup prefs export``: votes -> preference pairs (JSONL or Parquet).
- :mod:`ui.ratings`: Bradley–Terry leaderboard with bootstrap intervals.
"""
