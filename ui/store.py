"""The preference store: every vote the rating UI collects, in a SQL database (SQLAlchemy 2).

A vote is one prompt conversation, the candidate answers shown for it (each with its model, model
version, sampling settings and finish reason, in the order they were shown), who rated it, and the
outcome: a ranking given as groups of candidate positions, best group first, ties sharing a group
(``[[1], [0]]``: the second answer beat the first; ``[[0, 1]]``: a tie). "All bad" is stored as
``not_rankable`` with an empty ranking, so it never turns into a preference pair.

The comparison queue: pairs of replies generated elsewhere (``groundup evaluate --queue`` puts its chat
pairs there), shown in the Compare tab before any generated round, in the order queued, until each has a
vote or is skipped. A vote on a queued pair is an ordinary vote (same table, same export, same
leaderboard) that names its queue entry (``queue_entry``).

SQLite is the default (a file per run): WAL mode so the UI can read the leaderboard while a vote is
written, ``synchronous=FULL`` so a vote acknowledged to the rater survives a crash of the server, and
one transaction per vote. Any other SQLAlchemy URL (PostgreSQL, MySQL) works the same way.
"""
from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from pipelines.config import ConfigError

Role = Literal["system", "user", "assistant"]
Outcome = Literal["ranked", "not_rankable"]
MIN_CANDIDATES, MAX_CANDIDATES = 2, 16


class InvalidVoteError(ValueError):
    """A vote that cannot be stored as given; the message is one line naming the field."""


class DatabaseError(ConfigError):
    """The database URL or file cannot be used (a user mistake in a flag or config: exit 2)."""


# ---- records in and out -------------------------------------------------------------------------------
class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)


class Message(_Record):
    role: Role
    content: str


class Candidate(_Record):
    """One answer shown to the rater. ``sampling``: the request's settings (temperature, top_p, ...)."""

    model: str = Field(min_length=1)
    content: str
    model_version: str = ""
    sampling: dict[str, Any] = Field(default_factory=dict)
    finish_reason: str | None = None


class VoteIn(_Record):
    """A vote as the UI submits it. ``ranking`` holds candidate positions (0 = first shown)."""

    messages: list[Message] = Field(min_length=1)
    candidates: list[Candidate] = Field(min_length=MIN_CANDIDATES, max_length=MAX_CANDIDATES)
    rater: str = Field(min_length=1, max_length=200)
    outcome: Outcome = "ranked"
    ranking: list[list[int]] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)
    presented_at: datetime | None = None  # when the answers were shown (time-to-vote for rater quality)
    queue_entry: int | None = None  # the comparison-queue entry voted on (None: a round generated in the app)

    @field_validator("rater")
    @classmethod
    def _strip_rater(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("rater id must not be blank")
        return value

    @model_validator(mode="after")
    def _check_outcome(self) -> VoteIn:
        if self.messages[-1].role != "user":
            raise ValueError("messages: the prompt conversation must end with a user message")
        if self.outcome == "not_rankable":
            if self.ranking:
                raise ValueError("ranking: must be empty when the outcome is not_rankable")
            return self
        check_ranking(self.ranking, len(self.candidates))
        return self

    @classmethod
    def parse(cls, data: VoteIn | dict[str, Any]) -> VoteIn:
        """Validate ``data``; any problem becomes one :class:`InvalidVoteError` line."""
        if isinstance(data, VoteIn):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise InvalidVoteError(_one_line(err)) from None


class VoteRecord(VoteIn):
    """A stored vote: what was submitted plus its id, public uid and the time it was stored (UTC)."""

    id: int
    uid: str
    created_at: datetime

    @property
    def is_tie(self) -> bool:
        return self.outcome == "ranked" and len(self.ranking) == 1


def check_ranking(ranking: list[list[int]], n_candidates: int) -> None:
    """A ranking must name each candidate position exactly once, in non-empty groups."""
    if not ranking:
        raise ValueError("ranking: is empty (use outcome not_rankable for 'all bad')")
    seen: list[int] = []
    for group in ranking:
        if not group:
            raise ValueError("ranking: contains an empty group")
        seen.extend(group)
    bad = [p for p in seen if not 0 <= p < n_candidates]
    if bad:
        raise ValueError(f"ranking: position {bad[0]} is not a candidate (there are {n_candidates})")
    duplicates = sorted({p for p in seen if seen.count(p) > 1})
    if duplicates:
        raise ValueError(f"ranking: candidate {duplicates[0]} appears more than once")
    missing = sorted(set(range(n_candidates)) - set(seen))
    if missing:
        raise ValueError(f"ranking: candidate {missing[0]} is missing (each candidate must be ranked once)")


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "vote"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return f"invalid vote: {field}: {message}" if field != "vote" else f"invalid vote: {message}"


# ---- tables ------------------------------------------------------------------------------------------
class Base(DeclarativeBase):
    pass


class VoteRow(Base):
    __tablename__ = "votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    presented_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rater: Mapped[str] = mapped_column(String(200), index=True)
    messages: Mapped[list] = mapped_column(JSON)
    outcome: Mapped[str] = mapped_column(String(16))
    ranking: Mapped[list] = mapped_column(JSON)
    flags: Mapped[list] = mapped_column(JSON)
    queue_entry_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    candidates: Mapped[list[CandidateRow]] = relationship(
        back_populates="vote", order_by="CandidateRow.position", cascade="all, delete-orphan")


class CandidateRow(Base):
    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vote_id: Mapped[int] = mapped_column(ForeignKey("votes.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # 0 = shown first ("Answer A")
    model: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[str] = mapped_column(String(200))
    content: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    vote: Mapped[VoteRow] = relationship(back_populates="candidates")


class QueueRow(Base):
    """One queued comparison: a prompt and two replies, in the order they are shown (A, B)."""

    __tablename__ = "comparison_queue"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # the order served
    batch: Mapped[str] = mapped_column(String(200), index=True)  # what queued it (one evaluate run)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    messages: Mapped[list] = mapped_column(JSON)
    model_a: Mapped[str] = mapped_column(String(200))
    reply_a: Mapped[str] = mapped_column(Text)
    model_b: Mapped[str] = mapped_column(String(200))
    reply_b: Mapped[str] = mapped_column(Text)
    swapped: Mapped[bool] = mapped_column(Boolean)  # A is the pair's second model (sides drawn with ``seed``)
    seed: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict] = mapped_column(JSON)
    skipped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    skipped_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class QueuedPair(_Record):
    """A pair to queue: a prompt, then the two models and their replies (in any order: sides are drawn)."""

    messages: list[Message] = Field(min_length=1)
    model_a: str = Field(min_length=1)
    reply_a: str
    model_b: str = Field(min_length=1)
    reply_b: str
    sampling: dict[str, Any] = Field(default_factory=dict)


class QueueEntry(QueuedPair):
    """A stored queue entry: shown as Answer A = ``model_a``/``reply_a``, Answer B = ``model_b``/``reply_b``."""

    id: int
    batch: str
    created_at: datetime
    swapped: bool
    seed: int


# ---- the store -----------------------------------------------------------------------------------------
def normalize_database_url(value: str) -> str:
    """A SQLAlchemy URL, or a plain file path meaning a SQLite database there."""
    value = value.strip()
    if not value:
        raise DatabaseError("database: empty URL")
    if "://" not in value:
        return f"sqlite:///{Path(value).expanduser().resolve()}"
    return value


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers (leaderboard, export) never block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acknowledged == durable
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")  # wait for another writer rather than fail the vote
    cursor.close()


class PreferenceStore:
    """Votes in a SQL database. ``create=False`` opens an existing store only (export, ratings)."""

    def __init__(self, url: str, create: bool = True):
        self.url = normalize_database_url(url)
        try:
            backend = make_url(self.url).get_backend_name()
        except ArgumentError:
            raise DatabaseError(f"database {url!r}: not a SQLAlchemy URL (e.g. sqlite:///prefs.db)") from None
        self.is_sqlite = backend == "sqlite"
        path = _sqlite_file(self.url)
        if path is not None:
            if not create and not path.is_file():
                raise DatabaseError(f"database {path}: no such file")
            if create:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise DatabaseError(
                        f"database {path}: cannot create its folder ({err.strerror})") from None
        try:
            self.engine: Engine = create_engine(self.url)
        except (ArgumentError, NoSuchModuleError) as err:
            raise DatabaseError(f"database {url!r}: {str(err).splitlines()[0]}") from None
        except ImportError as err:
            raise DatabaseError(f"database {url!r}: its driver is not installed ({err.name})") from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _tune_sqlite)
        try:
            if create:
                Base.metadata.create_all(self.engine)
            elif not inspect(self.engine).has_table(VoteRow.__tablename__):
                raise DatabaseError(f"database {url}: has no votes table (not a preference store)")
            self._migrate()
        except SQLAlchemyError as err:
            message = str(getattr(err, "orig", err)).splitlines()[0]
            raise DatabaseError(f"database {url}: cannot open ({message})") from None

    def _migrate(self) -> None:
        """Bring a store made by an older version up to date (new columns are nullable: old rows stay valid;
        new tables come from ``create_all``)."""
        columns = {c["name"] for c in inspect(self.engine).get_columns(VoteRow.__tablename__)}
        if "queue_entry_id" not in columns:
            with self.engine.begin() as connection:
                connection.execute(text("ALTER TABLE votes ADD COLUMN queue_entry_id INTEGER"))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing
    def add_vote(self, vote: VoteIn | dict[str, Any]) -> VoteRecord:
        """Validate and store one vote in its own transaction; returns it once committed (durable)."""
        vote = VoteIn.parse(vote)
        if vote.queue_entry is not None and self.queue_entry(vote.queue_entry) is None:
            raise InvalidVoteError(f"invalid vote: queue_entry: no queued comparison {vote.queue_entry}")
        row = VoteRow(
            uid=uuid.uuid4().hex, created_at=datetime.now(UTC), presented_at=vote.presented_at,
            rater=vote.rater, messages=[m.model_dump() for m in vote.messages], outcome=vote.outcome,
            ranking=[list(g) for g in vote.ranking], flags=list(vote.flags), queue_entry_id=vote.queue_entry,
            candidates=[CandidateRow(position=i, model=c.model, model_version=c.model_version,
                                     content=c.content, sampling=_jsonable(c.sampling),
                                     finish_reason=c.finish_reason)
                        for i, c in enumerate(vote.candidates)])
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
        return _to_record(row)

    # -- the comparison queue
    def enqueue(self, pairs: list[QueuedPair | dict[str, Any]], batch: str, seed: int) -> list[QueueEntry]:
        """Queue pairs (in one transaction), each pair's sides drawn with ``random.Random(seed)`` so position
        favours neither model; the draw is stored (``swapped``). Served in this order after what is queued."""
        parsed = []
        for index, pair in enumerate(pairs):
            try:
                parsed.append(pair if isinstance(pair, QueuedPair) else QueuedPair.model_validate(pair))
            except ValidationError as err:
                raise InvalidVoteError(_one_line(err).replace("invalid vote", f"invalid queued pair {index}")) from None
        rng, now = random.Random(seed), datetime.now(UTC)
        rows = []
        for pair in parsed:
            swapped = rng.random() < 0.5
            (model_a, reply_a), (model_b, reply_b) = ((pair.model_b, pair.reply_b), (pair.model_a, pair.reply_a)) \
                if swapped else ((pair.model_a, pair.reply_a), (pair.model_b, pair.reply_b))
            rows.append(QueueRow(batch=batch, created_at=now, messages=[m.model_dump() for m in pair.messages],
                                 model_a=model_a, reply_a=reply_a, model_b=model_b, reply_b=reply_b, swapped=swapped,
                                 seed=seed, sampling=_jsonable(pair.sampling)))
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add_all(rows)
        return [_to_entry(r) for r in rows]

    def _open_entries(self):
        voted = select(VoteRow.queue_entry_id).where(VoteRow.queue_entry_id.is_not(None))
        return select(QueueRow).where(QueueRow.skipped_at.is_(None), QueueRow.id.not_in(voted))

    def next_queued(self, exclude: set[int] | frozenset[int] = frozenset()) -> QueueEntry | None:
        """The first queued comparison (in the order queued) with no vote that nobody skipped."""
        query = self._open_entries()
        if exclude:
            query = query.where(QueueRow.id.not_in(sorted(exclude)))
        with Session(self.engine) as session:
            row = session.scalar(query.order_by(QueueRow.id).limit(1))
            return _to_entry(row) if row is not None else None

    def queue_entry(self, entry_id: int) -> QueueEntry | None:
        with Session(self.engine) as session:
            row = session.get(QueueRow, entry_id)
            return _to_entry(row) if row is not None else None

    def skip_queued(self, entry_id: int, rater: str = "") -> None:
        """Take an entry off the queue without a vote (a rater pressed Next round instead of voting)."""
        with Session(self.engine) as session, session.begin():
            session.execute(update(QueueRow).where(QueueRow.id == entry_id, QueueRow.skipped_at.is_(None))
                            .values(skipped_at=datetime.now(UTC), skipped_by=rater or None))

    def queue_waiting(self) -> int:
        """Queued comparisons still to be shown (no vote, not skipped)."""
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(self._open_entries().subquery())) or 0

    # -- reading
    def count(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(VoteRow)) or 0

    def get(self, uid: str) -> VoteRecord | None:
        with Session(self.engine) as session:
            query = select(VoteRow).options(selectinload(VoteRow.candidates)).where(VoteRow.uid == uid)
            row = session.scalar(query)
            return _to_record(row) if row is not None else None

    def iter_votes(self, rater: str | None = None, batch_size: int = 500) -> Iterator[VoteRecord]:
        """Every vote in the order stored (optionally one rater's), read in batches."""
        last_id = 0
        while True:
            query = select(VoteRow).options(selectinload(VoteRow.candidates)).where(VoteRow.id > last_id)
            if rater is not None:
                query = query.where(VoteRow.rater == rater)
            with Session(self.engine) as session:
                rows = list(session.scalars(query.order_by(VoteRow.id).limit(batch_size)))
                records = [_to_record(r) for r in rows]
            if not records:
                return
            yield from records
            last_id = records[-1].id

    def votes(self, rater: str | None = None) -> list[VoteRecord]:
        return list(self.iter_votes(rater))

    def comparison_counts(self) -> dict[str, int]:
        """Per model, the votes that compared its answer with another model's (what a round balances)."""
        mixed = (select(CandidateRow.vote_id).group_by(CandidateRow.vote_id)
                 .having(func.count(func.distinct(CandidateRow.model)) > 1))
        query = (select(CandidateRow.model, func.count(func.distinct(CandidateRow.vote_id)))
                 .where(CandidateRow.vote_id.in_(mixed)).group_by(CandidateRow.model))
        with Session(self.engine) as session:
            return {model: int(count) for model, count in session.execute(query)}

    def journal_mode(self) -> str:
        with self.engine.connect() as connection:
            return str(connection.execute(text("PRAGMA journal_mode")).scalar()).lower()


def _jsonable(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value, default=str))


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were stored in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _to_entry(row: QueueRow) -> QueueEntry:
    return QueueEntry(id=row.id, batch=row.batch, created_at=_utc(row.created_at), messages=row.messages,
                      model_a=row.model_a, reply_a=row.reply_a, model_b=row.model_b, reply_b=row.reply_b,
                      swapped=row.swapped, seed=row.seed, sampling=row.sampling)


def _to_record(row: VoteRow) -> VoteRecord:
    return VoteRecord(
        id=row.id, uid=row.uid, created_at=_utc(row.created_at), presented_at=_utc(row.presented_at),
        rater=row.rater, messages=row.messages, outcome=row.outcome, ranking=row.ranking, flags=row.flags,
        queue_entry=row.queue_entry_id,
        candidates=[Candidate(model=c.model, model_version=c.model_version, content=c.content,
                              sampling=c.sampling, finish_reason=c.finish_reason) for c in row.candidates])
