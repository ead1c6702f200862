"""The arena's database, through SQLAlchemy: SQLite in WAL mode by default, any SQLAlchemy URL
(PostgreSQL for a team).

Three tables. ``images``: every image shown, stored once as a PNG under the images folder and
addressed by its uid (32 hex digits), with the model, prompt and seed that made it (or the eval
manifest path it came from). ``pairs``: every pair the server served, to which rater, with the
two image uids as shown (left, right). ``judgments``: one row per decision, keyed by a uid the
browser makes, so a retried request never counts twice, naming the served pair it judges (at
most one judgment a pair), with the rater, the prompt, the two image uids, the choice (left,
right, tie), when the pair was shown and decided, and the decision latency. A Pick-a-Pic
judgment means "this rater saw these two images side by side": only a pair served to that rater
can be judged, once. A judgment is committed (SQLite: ``synchronous=FULL``) before the server
answers, so an acknowledged judgment survives a killed server.

A database written before pairs were recorded gains the ``pair_uid`` column when opened; its
earlier judgments name no served pair and are left out of counts and exports.
"""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

CHOICES = ("left", "right", "tie")


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    __tablename__ = "images"

    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    prompt: Mapped[str] = mapped_column(String(2000))
    model: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str | None] = mapped_column(String(1000), nullable=True)  # manifest path
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=func.now())


class PairRow(Base):
    __tablename__ = "pairs"

    uid: Mapped[str] = mapped_column(String(32), primary_key=True)
    rater: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[str] = mapped_column(String(2000))
    left_uid: Mapped[str] = mapped_column(String(32), ForeignKey("images.uid"))
    right_uid: Mapped[str] = mapped_column(String(32), ForeignKey("images.uid"))
    served_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=func.now())


class JudgmentRow(Base):
    __tablename__ = "judgments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True)  # made by the browser: idempotent
    # the served pair it judges, once; None only in a database older than served pairs
    pair_uid: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("pairs.uid"), unique=True, nullable=True
    )
    rater: Mapped[str] = mapped_column(String(64), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(String(2000))
    left_uid: Mapped[str] = mapped_column(String(32), ForeignKey("images.uid"))
    right_uid: Mapped[str] = mapped_column(String(32), ForeignKey("images.uid"))
    choice: Mapped[str] = mapped_column(String(8))
    shown_at: Mapped[datetime.datetime] = mapped_column(DateTime)
    decided_at: Mapped[datetime.datetime] = mapped_column(DateTime)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime.datetime] = mapped_column(DateTime, default=func.now())


def new_uid() -> str:
    return uuid.uuid4().hex


def open_engine(url: str):
    """An engine for ``url`` with the tables created. SQLite: WAL journal, full fsync on commit,
    and a busy timeout, so concurrent raters wait for the writer instead of failing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        connect_args={"timeout": 30, "check_same_thread": False} if sqlite else {},
        pool_pre_ping=not sqlite,
    )
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    Base.metadata.create_all(engine)
    if "pair_uid" not in {c["name"] for c in inspect(engine).get_columns("judgments")}:
        with engine.begin() as connection:  # a database from before served pairs
            connection.execute(text("ALTER TABLE judgments ADD COLUMN pair_uid VARCHAR(32)"))
            connection.execute(
                text("CREATE UNIQUE INDEX ix_judgments_pair_uid ON judgments (pair_uid)")
            )
    return engine


def add_image(engine, images_dir: Path, image, prompt: str, model: str, seed=None, source=None):
    """Store ``image`` (PIL) as ``images_dir/<uid>.png`` and its row; returns the uid."""
    from pickalign.runtime import atomic_path

    uid = new_uid()
    with atomic_path(Path(images_dir) / f"{uid}.png") as tmp:
        image.save(tmp, format="PNG")
    with Session(engine) as session, session.begin():
        session.add(ImageRow(uid=uid, prompt=prompt, model=model, seed=seed, source=source))
    return uid


def image_for_source(engine, source: str, prompt: str, model: str, seed) -> str | None:
    """The uid of the image already stored for an eval manifest path with this prompt, model
    and seed, if any (a regenerated or other evaluation's image at the same path is another)."""
    query = select(ImageRow.uid).where(
        ImageRow.source == source,
        ImageRow.prompt == prompt,
        ImageRow.model == model,
        ImageRow.seed == seed,
    )
    with Session(engine) as session:
        return session.scalar(query.limit(1))


def serve_pair(engine, rater: str, prompt: str, left: str, right: str) -> str:
    """Record that ``rater`` is shown images ``left`` and ``right`` side by side; the pair's uid."""
    uid = new_uid()
    with Session(engine) as session, session.begin():
        session.add(PairRow(uid=uid, rater=rater, prompt=prompt, left_uid=left, right_uid=right))
    return uid


def served_pair(engine, pair_uid: str, rater: str) -> PairRow | None:
    """The pair ``pair_uid`` if it was served to ``rater``, else None."""
    with Session(engine) as session:
        pair = session.get(PairRow, pair_uid)
        return pair if pair is not None and pair.rater == rater else None


class JudgmentConflict(ValueError):
    """A judgment that contradicts a recorded one: its pair was judged already, or its uid
    was used for another pair."""


def record_judgment(engine, pair: PairRow, **fields) -> tuple[bool, int]:
    """Commit one judgment of the served ``pair`` (its prompt and images come from the pair);
    (True, its id), or (False, the earlier id) when this very judgment (same uid, same pair,
    same choice) was recorded already (a retried request). Raises ``JudgmentConflict`` when
    the pair has another judgment, the uid judged another pair, or a retry changes the choice."""
    row = dict(
        fields,
        pair_uid=pair.uid,
        rater=pair.rater,
        prompt=pair.prompt,
        left_uid=pair.left_uid,
        right_uid=pair.right_uid,
    )
    earlier = _recorded(engine, row)
    if earlier is not None:
        return False, earlier
    try:
        with Session(engine) as session, session.begin():
            judgment = JudgmentRow(**row)
            session.add(judgment)
            session.flush()
            return True, judgment.id
    except IntegrityError:  # another request landed first: the same judgment, or a conflict
        earlier = _recorded(engine, row)
        if earlier is None:
            raise
        return False, earlier


def _recorded(engine, row: dict) -> int | None:
    """The id of the judgment ``row`` if it is recorded already, None if neither its uid nor
    its pair has a judgment; ``JudgmentConflict`` if either has another one."""
    with Session(engine) as session:
        earlier = session.scalar(
            select(JudgmentRow).where(
                (JudgmentRow.uid == row["uid"]) | (JudgmentRow.pair_uid == row["pair_uid"])
            )
        )
    if earlier is None:
        return None
    if earlier.uid == row["uid"] and earlier.pair_uid == row["pair_uid"]:
        if earlier.choice != row["choice"]:
            raise JudgmentConflict("this judgment was recorded with another choice")
        return earlier.id
    if earlier.pair_uid == row["pair_uid"]:
        raise JudgmentConflict("this pair was judged already")
    raise JudgmentConflict("this judgment uid was used for another pair")


def count_judgments(engine, rater: str | None = None) -> int:
    with Session(engine) as session:
        query = select(func.count(JudgmentRow.id)).where(JudgmentRow.pair_uid.is_not(None))
        if rater is not None:
            query = query.where(JudgmentRow.rater == rater)
        return int(session.scalar(query))


def all_judgments(engine) -> list[dict]:
    """Every judgment of a served pair with its two images' rows, oldest first."""
    with Session(engine) as session:
        images = {row.uid: row for row in session.scalars(select(ImageRow))}
        rows = []
        judged = select(JudgmentRow).where(JudgmentRow.pair_uid.is_not(None))
        for j in session.scalars(judged.order_by(JudgmentRow.id)):
            left, right = images[j.left_uid], images[j.right_uid]
            rows.append(
                {
                    "id": j.id,
                    "uid": j.uid,
                    "rater": j.rater,
                    "mode": j.mode,
                    "prompt": j.prompt,
                    "left_uid": j.left_uid,
                    "right_uid": j.right_uid,
                    "left_model": left.model,
                    "right_model": right.model,
                    "left_source": left.source,
                    "right_source": right.source,
                    "choice": j.choice,
                    "shown_at": j.shown_at,
                    "decided_at": j.decided_at,
                    "latency_ms": j.latency_ms,
                }
            )
        return rows
