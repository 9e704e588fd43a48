"""atomic_write: all or nothing, and the file mode a plain open() would give."""

import os

import pytest

from pipeline.atomic import atomic_write


def test_atomic_write_mode_and_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, lambda tmp: tmp.write_text("one"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError):

        def fail(tmp):
            tmp.write_text("half")
            raise RuntimeError("boom")

        atomic_write(target, fail)
    assert target.read_text() == "one" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
