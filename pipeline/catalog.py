"""The workspace catalog: every SQLAlchemy model lives here, plus engine set-up and sessions.

SQLite is opened in WAL mode with ``synchronous=NORMAL``, a busy timeout and foreign keys on every
connection; write transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the
busy timeout instead of failing with "database is locked" when a read lock is upgraded.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from pipeline.errors import PipelineError

#: Bump when a table or column changes; add the migration to ``_MIGRATIONS``.
SCHEMA_VERSION = 7
BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    """Timezone-aware now, for timestamps."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base for every catalog table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the workspace: schema version, label schema, slice size."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class Ingest(Base):
    """One `pipeline ingest` run that added sources."""

    __tablename__ = "ingests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    src: Mapped[str] = mapped_column(String)
    format: Mapped[str] = mapped_column(String)
    config: Mapped[dict[str, Any]]
    tool_version: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PatientSplit(Base):
    """Which split a patient belongs to. Slices inherit it through their source volume."""

    __tablename__ = "splits"
    patient: Mapped[str] = mapped_column(String, primary_key=True)
    split: Mapped[str] = mapped_column(String, index=True)
    seed: Mapped[int] = mapped_column(Integer)
    ingest_id: Mapped[int] = mapped_column(ForeignKey("ingests.id"))


class Source(Base):
    """One source volume (a NIfTI pair, or one patient's PNG slices) and its slice-cache file."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("content_sha256", name="uq_source_content"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ingest_id: Mapped[int] = mapped_column(ForeignKey("ingests.id"))
    patient: Mapped[str] = mapped_column(ForeignKey("splits.patient"), index=True)
    name: Mapped[str] = mapped_column(String)
    image_path: Mapped[str] = mapped_column(String)
    label_path: Mapped[str] = mapped_column(String)
    content_sha256: Mapped[str] = mapped_column(String)  # image + labels
    image_sha256: Mapped[str] = mapped_column(String, index=True)  # the image (slices) alone
    format: Mapped[str] = mapped_column(String)
    units: Mapped[str] = mapped_column(String)  # "HU" or "display"
    window_lo: Mapped[float] = mapped_column(Float)
    window_hi: Mapped[float] = mapped_column(Float)
    original_shape: Mapped[list[Any]]
    original_spacing: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    spacing: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # after resizing
    size: Mapped[int] = mapped_column(Integer)
    cache_file: Mapped[str] = mapped_column(String)
    n_slices: Mapped[int] = mapped_column(Integer)
    slices: Mapped[list[Slice]] = relationship(back_populates="source", order_by="Slice.index")
    split_row: Mapped[PatientSplit] = relationship()


class Slice(Base):
    """One cached 2D axial slice: row ``index`` of its source's cache file."""

    __tablename__ = "slices"
    __table_args__ = (UniqueConstraint("source_id", "index", name="uq_slice_position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    z: Mapped[int] = mapped_column(Integer)  # position in the source volume (after reorientation)
    foreground: Mapped[float] = mapped_column(Float)
    classes: Mapped[list[Any]]  # class indices present in the mask
    source: Mapped[Source] = relationship(back_populates="slices")


class PrivacyCalibration(Base):
    """A calibrated "too similar" threshold for one build of the source index."""

    __tablename__ = "privacy_calibrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    index_fingerprint: Mapped[str] = mapped_column(String, index=True)
    embedder: Mapped[str] = mapped_column(String)
    k: Mapped[int] = mapped_column(Integer)
    quantile: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: user threshold
    threshold: Mapped[float] = mapped_column(Float)  # SSIM
    texture_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    n_baseline: Mapped[int] = mapped_column(Integer)
    baseline: Mapped[list[Any]]  # the different-person SSIM scores
    texture_baseline: Mapped[list[Any]]
    # bound, method, each detector, planted-copy scores and recall per kind (schema 6)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _tables_only(session: Session) -> None:
    """A migration that only adds tables: ``create_all`` after the migrations creates them."""


class Run(Base):
    """A training run (``runs/<name>/``)."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    preset: Mapped[str] = mapped_column(String)
    config: Mapped[dict[str, Any]]
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    generator_path: Mapped[str | None] = mapped_column(String, nullable=True)
    generator_sha256: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CandidateBatch(Base):
    """A batch of generated candidates (``candidates/<name>/``), its privacy run and gates."""

    __tablename__ = "candidate_batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    generator_sha256: Mapped[str] = mapped_column(String)
    masks: Mapped[str] = mapped_column(String)  # augmented | heldout | dir
    config: Mapped[dict[str, Any]]  # count, seed, deformation settings, mask folder
    units: Mapped[str] = mapped_column(String)  # HU | display
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    gates: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    gates_passed: Mapped[bool | None] = mapped_column(nullable=True)
    filtered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="batch", order_by="Candidate.index"
    )


class Candidate(Base):
    """One generated image with its mask, provenance and privacy verdict."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("batch_id", "index", name="uq_candidate_position"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("candidate_batches.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String)  # cand_00000: file stem in the batch folder
    mask_source: Mapped[str] = mapped_column(String)  # augmented | heldout | file
    source_slice_id: Mapped[int | None] = mapped_column(ForeignKey("slices.id"), nullable=True)
    mask_file: Mapped[str | None] = mapped_column(String, nullable=True)  # user masks
    transform: Mapped[dict[str, Any]]
    seed: Mapped[int] = mapped_column(Integer)
    spacing: Mapped[list[Any]]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    privacy_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # SSIM
    texture_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    privacy_margin: Mapped[float | None] = mapped_column(Float, nullable=True)
    nearest_slice_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    flagged: Mapped[bool | None] = mapped_column(nullable=True)  # None: not filtered yet
    batch: Mapped[CandidateBatch] = relationship(back_populates="candidates")


class Reviewer(Base):
    """A physician (or admin) who may review; the password only as a salted scrypt hash."""

    __tablename__ = "reviewers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    role: Mapped[str] = mapped_column(String)  # reviewer | admin | demo
    password_hash: Mapped[str] = mapped_column(String)
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LoginEvent(Base):
    """Every login attempt (for rate limiting and the audit log)."""

    __tablename__ = "login_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, index=True)  # as typed
    ok: Mapped[bool] = mapped_column()
    reason: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Decision(Base):
    """One append-only review event: accept, reject, or the undo of an earlier decision."""

    __tablename__ = "decisions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("reviewers.id"), index=True)
    decision: Mapped[str] = mapped_column(String)  # accept | reject | undo
    reason: Mapped[str] = mapped_column(String, default="")
    undoes_id: Mapped[int | None] = mapped_column(ForeignKey("decisions.id"), nullable=True)
    imported: Mapped[bool] = mapped_column(default=False)
    app_version: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Release(Base):
    """One bundle `pipeline export` built: the release ledger (what left, when, under which id)."""

    __tablename__ = "releases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String, index=True)  # DatasetNNN_Name
    dataset_id: Mapped[int] = mapped_column(Integer, index=True)
    folder: Mapped[str] = mapped_column(String)  # where it was written (absolute)
    export_time: Mapped[str] = mapped_column(String)  # as the manifest says
    manifest_sha256: Mapped[str] = mapped_column(String)
    zip_sha256: Mapped[str] = mapped_column(String)
    policy: Mapped[str] = mapped_column(String)
    by: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cases: Mapped[list[ReleaseCase]] = relationship(
        back_populates="release", order_by="ReleaseCase.id"
    )


class ReleaseCase(Base):
    """One case of a release: which candidate it was, and the digests of its two files."""

    __tablename__ = "release_cases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id"), index=True)
    case: Mapped[str] = mapped_column(String)
    image_sha256: Mapped[str] = mapped_column(String)
    label_sha256: Mapped[str] = mapped_column(String)
    release: Mapped[Release] = relationship(back_populates="cases")


def _calibration_details(session: Session) -> None:
    """Schema 6: privacy calibrations keep both tails and their bound in ``details``."""
    if _has_table(session, "privacy_calibrations"):
        session.connection().exec_driver_sql(
            "ALTER TABLE privacy_calibrations ADD COLUMN details JSON"
        )


# 2: privacy_calibrations; 3: runs; 4: candidate_batches, candidates;
# 5: reviewers, login_events, decisions; 6: privacy_calibrations.details;
# 7: releases, release_cases (the release ledger)
_MIGRATIONS: dict[int, Any] = {
    2: _tables_only,
    3: _tables_only,
    4: _tables_only,
    5: _tables_only,
    6: _calibration_details,
    7: _tables_only,
}


def _configure(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so the "begin" hook below decides.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def create_catalog_engine(path: Path) -> Engine:
    """An engine for ``catalog.db`` with the connection settings above."""
    engine = create_engine(f"sqlite:///{path}", future=True)
    _configure(engine)
    return engine


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction holds the write lock from its start, committed on success."""
    with (
        Session(engine.execution_options(sqlite_begin="IMMEDIATE")) as session,
        session.begin(),
    ):
        session.connection()  # emit BEGIN IMMEDIATE now, not at the first statement
        yield session


def read_session(engine: Engine) -> Session:
    """A plain session for reads (deferred transaction)."""
    return Session(engine)


def get_meta(session: Session, key: str) -> str | None:
    """A value from the meta table, or None."""
    row = session.get(Meta, key)
    return None if row is None else row.value


def set_meta(session: Session, key: str, value: str) -> None:
    """Insert or replace a meta value."""
    row = session.get(Meta, key)
    if row is None:
        session.add(Meta(key=key, value=value))
    else:
        row.value = value


def init_catalog(path: Path) -> Engine:
    """Open ``catalog.db``, creating or migrating it; refuse a newer or foreign schema."""
    existed = path.exists()
    if existed and path.is_file() and path.stat().st_size == 0:
        # an empty file is not a new workspace: something truncated the catalog, and writing a
        # fresh schema into it would report an empty workspace as if nothing had been lost
        raise PipelineError(
            "catalog.db is an empty file, not a catalog (restore it from a backup, or delete "
            "it to start a new workspace)",
            path=path,
        )
    engine = create_catalog_engine(path)
    try:
        with write_session(engine) as session:
            if existed:
                if not _has_table(session, "meta") or get_meta(session, "schema_version") is None:
                    raise PipelineError(
                        "not a cardiac-synth catalog (no schema version)", path=path
                    )
                raw = get_meta(session, "schema_version") or ""
                if not re.fullmatch(r"[0-9]{1,9}", raw) or int(raw) < 1:
                    raise PipelineError(
                        f"catalog schema version {raw[:20]!r} is not a whole number ≥ 1", path=path
                    )
                version = int(raw)
                if version > SCHEMA_VERSION:
                    raise PipelineError(
                        f"catalog schema version {version} is newer than this cardiac-synth "
                        f"supports ({SCHEMA_VERSION}); upgrade cardiac-synth to open it",
                        path=path,
                    )
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    _MIGRATIONS[step](session)
            Base.metadata.create_all(session.connection())
            set_meta(session, "schema_version", str(SCHEMA_VERSION))
            if get_meta(session, "review_key") is None:
                # keys the review codes reviewers see instead of batch and candidate names
                set_meta(session, "review_key", secrets.token_hex(16))
    except (DatabaseError, OperationalError) as exc:
        engine.dispose()
        raise PipelineError(f"cannot open catalog ({exc.orig})", path=path) from None
    except PipelineError:
        engine.dispose()
        raise
    return engine


def _has_table(session: Session, name: str) -> bool:
    row = (
        session.connection()
        .exec_driver_sql("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
        .first()
    )
    return row is not None
