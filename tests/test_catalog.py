import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import func, select, text

from pipeline.catalog import SCHEMA_VERSION, Meta, read_session, set_meta, write_session
from pipeline.errors import PipelineError
from pipeline.workspace import open_workspace


def test_connection_pragmas(ws):
    with ws.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000


def test_write_session_begins_immediate(ws):
    with write_session(ws.engine) as session:
        # Under BEGIN IMMEDIATE the write lock is held before any write, so a second writer
        # cannot start: check through a raw second connection with no busy timeout.
        import sqlite3

        other = sqlite3.connect(ws.catalog_path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        set_meta(session, "probe", "1")


def test_foreign_keys_enforced(ws):
    from sqlalchemy.exc import IntegrityError

    from pipeline.catalog import Slice

    with pytest.raises(IntegrityError), write_session(ws.engine) as session:
        session.add(Slice(source_id=12345, index=0, z=0, foreground=0.1, classes=[0]))


def test_newer_schema_is_refused(ws_path):
    ws = open_workspace(ws_path)
    with write_session(ws.engine) as session:
        set_meta(session, "schema_version", str(SCHEMA_VERSION + 1))
    ws.close()
    with pytest.raises(PipelineError, match="newer than this cardiac-synth supports") as exc:
        open_workspace(ws_path)
    assert "catalog.db" in str(exc.value)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "catalog.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PipelineError, match="cannot open catalog"):
        open_workspace(tmp_path)


def test_two_processes_writing_concurrently_lose_nothing(ws):
    script = textwrap.dedent(
        """
        import sys
        from pipeline.catalog import create_catalog_engine, write_session, set_meta
        engine = create_catalog_engine(sys.argv[1])
        for i in range(200):
            with write_session(engine) as s:
                set_meta(s, f"w{sys.argv[2]}-{i}", str(i))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ws.catalog_path), str(k)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with read_session(ws.engine) as session:
        n = session.scalar(select(func.count()).select_from(Meta).where(Meta.key.like("w%")))
    assert n == 400


def test_version_1_catalog_is_migrated(ws_path):
    import sqlite3

    open_workspace(ws_path).close()
    con = sqlite3.connect(ws_path / "catalog.db")
    con.execute("DROP TABLE privacy_calibrations")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.commit()
    con.close()
    ws = open_workspace(ws_path)
    with ws.engine.connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
        version = conn.execute(text("SELECT value FROM meta WHERE key='schema_version'")).scalar()
    ws.close()
    assert "privacy_calibrations" in tables and version == str(SCHEMA_VERSION)
