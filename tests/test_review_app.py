"""The reviewer app through streamlit.testing's AppTest on the real script, and the review CLI."""

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.catalog import (
    Candidate,
    Decision,
    LoginEvent,
    Reviewer,
    read_session,
    write_session,
)
from pipeline.validate import markdown_text
from pipeline.workspace import open_workspace
from tests.conftest import indexed_workspace, run

APP = Path(__file__).resolve().parents[1] / "reviewer_app" / "app.py"
PW = "doctor-pass-1"


@pytest.fixture(scope="module")
def reviewed_master(tmp_path_factory):
    """A 32² workspace with a filtered batch of 8 candidates (one forced flagged) and two
    accounts."""
    root = tmp_path_factory.mktemp("rev")
    ws = indexed_workspace(root, volumes=8, seed=2, slices=12)
    tiny = ("--preset", "tiny", "--size", 32, "--batch", 8, "--steps", 2)
    assert run("train", "-w", ws, *tiny, "--run", "r").exit_code == 0
    gen = run("generate", "-w", ws, "--run", "r", "--count", 8, "--filter", "--features", "pixel")
    assert gen.exit_code in (0, 1), gen.stderr  # an untrained run fails its gates; fine here
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        cands = s.scalars(select(Candidate).order_by(Candidate.id)).all()
        for c in cands:
            c.flagged = c.index == 7  # exactly one flagged, whatever the scores said
    w.close()
    assert run("reviewers", "add", "ann", "-w", ws, "--password-stdin", input=PW + "\n")
    add = run(
        "reviewers", "add", "boss", "-w", ws, "--role", "admin", "--password-stdin", input=PW + "\n"
    )
    assert add.exit_code == 0, add.stderr
    return ws


@pytest.fixture
def ws(reviewed_master, tmp_path, monkeypatch):
    dst = tmp_path / "ws"
    shutil.copytree(reviewed_master, dst)
    monkeypatch.setenv("PIPELINE_WORKSPACE", str(dst))
    return dst


def app():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def log_in(at, name, password):
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    at.button[0].click().run()
    assert not at.exception, at.exception
    return at


def decisions(ws):
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        rows = [(d.candidate_id, d.decision, d.reason) for d in s.scalars(select(Decision))]
        logins = [(e.name, e.ok) for e in s.scalars(select(LoginEvent))]
    w.close()
    return rows, logins


def test_only_the_login_form_before_login_and_wrong_password(ws):
    at = app()
    assert [b.label for b in at.button] == ["Log in"]
    assert not at.get("imgs") and not at.sidebar.markdown and not at.dataframe
    log_in(at, "ann", "not the password")
    assert [e.value for e in at.error] == ["wrong name or password"]
    assert [b.label for b in at.button] == ["Log in"]
    _, logins = decisions(ws)
    assert logins == [("ann", False)]


def test_accept_reject_undo_write_rows(ws):
    at = log_in(app(), "ann", PW)
    labels = [b.label for b in at.button]
    assert "Accept (a)" in labels and "Reject (x)" in labels
    assert "1 of 7" not in at.sidebar.markdown[1].value and "0 of 7" in at.sidebar.markdown[1].value
    at.button(key="accept").click().run()
    at.text_input(key="note").input("streak")
    at.button(key="reason_3").click().run()  # reject as "artefact" (key 3)
    rows, _ = decisions(ws)
    assert [r[1] for r in rows] == ["accept", "reject"] and rows[1][2] == "artefact: streak"
    assert "2 of 7" in at.sidebar.markdown[1].value
    assert at.text_input(key="note").value == ""  # a note never carries over to the next image
    at.button(key="undo").click().run()
    rows, _ = decisions(ws)
    assert [r[1] for r in rows] == ["accept", "reject", "undo"]
    assert "1 of 7" in at.sidebar.markdown[1].value


def test_flagged_candidates_cannot_be_accepted(ws):
    from pipeline.review import review_code, review_key

    at = log_in(app(), "ann", PW)
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        flagged = s.scalar(select(Candidate).where(Candidate.flagged.is_(True)))
        flagged_id = flagged.id
        flagged_name = review_code(review_key(s), flagged_id)  # what a reviewer's page calls it
    w.close()
    seen = set()
    for _ in range(7):  # accept the whole queue: the flagged one never comes up
        seen.add(at.subheader[0].value)
        at.button(key="accept").click().run()
    assert at.success[0].value == "Nothing left for you to review."
    shown = markdown_text(flagged_name)  # names reach the page escaped, as literal text
    assert not any(shown in s for s in seen) and len(seen) == 7
    assert any(shown in m.value for m in at.markdown)  # listed in the flagged tab
    rows, _ = decisions(ws)
    assert flagged_id not in [r[0] for r in rows]


def test_admin_sees_the_admin_tab(ws):
    at = log_in(app(), "boss", PW)
    assert [t.label for t in at.tabs][-1] == "Admin"
    at2 = log_in(app(), "ann", PW)
    assert "Admin" not in [t.label for t in at2.tabs]


def test_a_demoted_admin_loses_the_admin_views_at_once(ws):
    """Issue 23 C.11: the role was read once, at login; a demoted admin kept the admin tab."""
    at = log_in(app(), "boss", PW)
    assert [t.label for t in at.tabs][-1] == "Admin"
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        s.scalars(select(Reviewer).where(Reviewer.name == "boss")).one().role = "reviewer"
    w.close()
    at.run()
    assert "Admin" not in [t.label for t in at.tabs]
    assert "(reviewer)" in " ".join(m.value for m in at.sidebar.markdown)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_the_app_refuses_to_write_into_a_catalog_that_is_gone(ws, how):
    """Issue 23 B.5: with the catalog files deleted under a running app, Accept said "1 of 16
    reviewed" and stored nothing. The app now checks the file is the one it opened."""
    at = log_in(app(), "ann", PW)
    db = Path(ws) / "catalog.db"
    if how == "deleted":
        for f in Path(ws).glob("catalog.db*"):
            f.unlink()
    else:  # same content, another file (a restore from backup, a copy over it)
        copy = Path(ws) / "copy.db"
        shutil.copy(db, copy)
        copy.replace(db)
    at.button(key="accept").click().run()
    shown = " ".join(e.value for e in at.error)
    assert "deleted or replaced" in shown and "restart the app" in shown
    assert not any("1 of 7" in m.value for m in at.sidebar.markdown)


def import_as_ann(ws, csv, password_line):
    """`pipeline decisions import CSV --reviewer ann`, the password on stdin."""
    args = ("decisions", "import", csv, "-w", ws, "--reviewer", "ann", "--password-stdin")
    return run(*args, input=password_line)


def test_review_cli(ws, tmp_path):
    listed = run("reviewers", "list", "-w", ws, "--json")
    assert [r["name"] for r in __import__("json").loads(listed.stdout)] == ["ann", "boss"]
    dup = run("reviewers", "add", "ann", "-w", ws, "--password-stdin", input=PW + "\n")
    assert dup.exit_code == 2 and "already exists" in dup.stderr
    csv = tmp_path / "d.csv"
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        ids = [c.id for c in s.scalars(select(Candidate).order_by(Candidate.id))]
    w.close()
    csv.write_text(f"candidate,decision,reason\n{ids[0]},accept,\n{ids[7]},accept,\n")
    bad = import_as_ann(ws, csv, PW + "\n")
    assert bad.exit_code == 2 and "line 3" in bad.stderr and "flagged" in bad.stderr
    csv.write_text(f"candidate,decision,reason\n{ids[0]},accept,\n{ids[1]},reject,artefact\n")
    wrong = import_as_ann(ws, csv, "nope nope\n")
    assert wrong.exit_code == 2 and "wrong name or password" in wrong.stderr
    ok = import_as_ann(ws, csv, PW + "\n")
    assert ok.exit_code == 0, ok.stderr
    listing = run("decisions", "list", "-w", ws)
    assert "1 accepted" in listing.stdout and "1 flagged" in listing.stdout
    out = tmp_path / "log.csv"
    assert run("decisions", "export", "--csv", out, "-w", ws).exit_code == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[1].endswith(",True,0.1.0")
    assert run("reviewers", "policy", "two", "-w", ws).stdout.strip() == "review policy: two"
    assert "1 needs-second" in run("decisions", "list", "-w", ws).stdout
    assert run("reviewers", "disable", "ann", "-w", ws).exit_code == 0
    at = log_in(app(), "ann", PW)
    assert [e.value for e in at.error] == ["wrong name or password"]


def test_honeypots_mixed_in_unmarked_and_scored(ws):
    from pipeline.catalog import Reviewer
    from pipeline.review import queue, record_decision, reviewer_stats

    added = run("honeypots", "-w", ws, "--run", "r", "--count", 3, "--seed", 1)
    assert added.exit_code == 0, added.stderr
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        ann = s.scalar(select(Reviewer).where(Reviewer.name == "ann"))
        q = queue(s, ann, policy="one")
        assert len(q) == 10 and sum(x.honeypot for x in q) == 3
        assert q[-1].honeypot is False or q[0].honeypot is False  # not all bunched at one end
        for x in q:
            if x.honeypot:
                record_decision(s, ann, x.id, "reject", reason="too similar to a source scan")
        stats = {r["reviewer"]: r for r in reviewer_stats(s)}
        assert stats["ann"]["honeypots_seen"] == 3 and stats["ann"]["honeypot_catch_rate"] == 1.0
    w.close()
    at = log_in(app(), "ann", PW)
    assert "honeypot" not in " ".join(str(e.value) for e in at.subheader).lower()


def _expire(at):
    import time

    from pipeline.review import SESSION_IDLE_S

    at.session_state["last_seen"] = time.time() - SESSION_IDLE_S - 90  # idle 31.5 minutes


def test_writes_after_expiry_or_disabling_are_refused(ws):
    at = log_in(app(), "ann", PW)
    at.button(key="accept").click().run()
    assert len(decisions(ws)[0]) == 1
    _expire(at)
    at.button(key="accept").click().run()  # the callback runs before the script body
    assert len(decisions(ws)[0]) == 1 and at.text_input(key="login_name") is not None
    assert any("expired" in m.value for m in at.info)
    at = log_in(at, "ann", PW)
    _expire(at)
    at.button(key="undo").click().run()
    assert [r[1] for r in decisions(ws)[0]] == ["accept"]
    at = log_in(at, "ann", PW)
    assert run("reviewers", "disable", "ann", "-w", ws).exit_code == 0
    at.button(key="undo").click().run()  # an open page of a disabled account
    assert [r[1] for r in decisions(ws)[0]] == ["accept"]
    at.text_input(key="login_name")  # back at the login form (KeyError otherwise)


def test_images_are_inline_not_served_from_media_urls(ws):
    at = log_in(app(), "ann", PW)
    assert not at.get("imgs")  # st.image would register a /media/<hash> URL anyone can fetch
    pictures = [h.proto.body for h in at.get("html")]
    assert len(pictures) == 4  # the candidate and its three nearest source slices
    assert all(p.startswith('<img src="data:image/png;base64,') for p in pictures)


def test_a_busy_catalog_at_login_gives_a_retry_message(ws, monkeypatch):
    """A long write elsewhere (an import) holds SQLite's lock past the busy timeout: the login
    form says to retry instead of showing SQLAlchemy's traceback."""
    from sqlalchemy.exc import OperationalError

    import pipeline.review

    def locked(*args, **kwargs):
        raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))

    monkeypatch.setattr(pipeline.review, "login", locked)
    at = app()
    at.text_input(key="login_name").input("ann")
    at.text_input(key="login_password").input(PW)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any("busy" in w.value for w in at.warning)


def test_second_reader_sees_no_first_verdict(ws):
    """Blind double reading: under the two-reviewer policy a plain reviewer sees neither the
    other's name nor vote, and the queue order does not move the candidate the other accepted."""
    from pipeline.review import get_reviewer, record_decision, review_code, review_key

    assert run("reviewers", "policy", "two", "-w", ws).exit_code == 0
    assert run("reviewers", "add", "bob", "-w", ws, "--password-stdin", input=PW + "\n")
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        last = s.scalars(
            select(Candidate).where(Candidate.flagged.is_(False)).order_by(Candidate.id.desc())
        ).first()
        record_decision(s, get_reviewer(s, "ann"), last.id, "accept")
    with read_session(w.engine) as s:
        first = s.scalar(select(Candidate).order_by(Candidate.id))
        code = review_code(review_key(s), first.id)
    w.close()
    at = log_in(app(), "bob", PW)
    assert code in at.subheader[0].value  # order unchanged by ann's vote
    table = at.dataframe[0].value
    assert set(table["state"]) == {"open", "flagged"}
    assert not table["accepted by"].str.contains("ann").any()
    page = " ".join(str(e.value) for e in at.markdown) + " ".join(c.value for c in at.caption)
    assert "ann" not in page and "needs-second" not in page
    admin = log_in(app(), "boss", PW)  # admins keep the full view
    assert "needs-second" in set(admin.dataframe[0].value["state"])


def test_a_bare_reject_records_nothing_and_number_keys_give_reasons(ws):
    at = log_in(app(), "ann", PW)
    at.button(key="reject").click().run()  # Reject (x) with no reason: nothing recorded
    assert decisions(ws)[0] == []
    assert any("a reject needs a reason" in c.value for c in at.caption)
    at.button(key="reason_2").click().run()  # what the key "2" presses
    rows, _ = decisions(ws)
    assert [(r[1], r[2]) for r in rows] == [("reject", "anatomically implausible")]


def _alts(at):
    import re

    return [re.search(r'alt="([^"]*)"', h.proto.body).group(1) for h in at.get("html")]


def test_candidate_and_neighbours_share_one_window(ws):
    at = log_in(app(), "ann", PW)
    alts = _alts(at)
    assert len(alts) == 4 and all(a.endswith("soft tissue window 40/400 HU") for a in alts)
    at.radio(key="preset").set_value("cardiac").run()
    assert all(a.endswith("cardiac window 200/700 HU") for a in _alts(at))
    at.radio(key="compare").set_value("source 2").run()  # enlarge a neighbour beside it
    alts = _alts(at)
    assert alts[:2] == [
        "candidate · cardiac window 200/700 HU",
        "source 2 · cardiac window 200/700 HU",
    ]


def test_draw_takes_candidates_and_sources_through_the_same_window():
    import numpy as np

    from reviewer_app.views import draw

    hu = np.linspace(-200, 600, 32 * 32, dtype=np.float32).reshape(32, 32)
    window = (-1024.0, 2048.0)
    unit = (hu - window[0]) / (window[1] - window[0])
    pic = draw(unit, window=window, units="HU", preset="soft tissue")
    assert pic.shape == (512, 512, 3)
    grey = pic[::16, ::16, 0].astype(int)
    expected = np.clip((hu + 160) / 400, 0, 1) * 255  # soft tissue: level 40, width 400
    assert np.abs(grey - expected).max() <= 1


def test_admins_see_flagged_candidates_beside_their_nearest_source(ws):
    at = log_in(app(), "boss", PW)
    alts = _alts(at)
    assert any(a.startswith("flagged candidate ·") for a in alts)
    assert any(a.startswith("nearest source ·") for a in alts)
    plain = log_in(app(), "ann", PW)
    assert not any(a.startswith("flagged candidate") for a in _alts(plain))


def _page_text(at) -> str:
    """Everything a page says in words (headings, text, captions, provenance, tables)."""
    parts = [str(e.value) for kind in ("subheader", "markdown", "caption") for e in at.get(kind)]
    parts += [str(j.proto.body) for j in at.get("json")]
    parts += [str(df.value.to_dict("records")) for df in at.dataframe]
    return "\n".join(parts)


def test_a_honeypot_page_reads_like_any_other(ws):
    """C.13: the heading said `honeypots / cand_…`, the provenance "mask source: honeypot", the
    filter line "Not scored by the filter yet", the table batch `honeypots`. With codes and
    numbers masked, a plain reviewer's page for a honeypot must read like a candidate's."""
    import re

    from pipeline.review import review_code, review_key

    assert run("honeypots", "-w", ws, "--run", "r", "--count", 2, "--seed", 1).exit_code == 0
    w = open_workspace(ws, create=False)
    with read_session(w.engine) as s:
        key = review_key(s)
        kinds = {review_code(key, c.id): c.mask_source for c in s.scalars(select(Candidate))}
    w.close()
    at = log_in(app(), "ann", PW)
    pages: dict[str, set[str]] = {"honeypot": set(), "other": set()}
    for _ in range(9):  # 7 unflagged candidates and 2 honeypots
        heading = at.subheader[0].value
        code = re.search(r"[0-9a-f]{8}", heading).group(0)
        text = _page_text(at)
        assert "honeypot" not in text.lower() and "Not scored" not in text
        masked = re.sub(r"\b[0-9a-f]{8}\b", "<code>", text)
        masked = re.sub(r"[-+]?\d+(\.\d+)?", "#", masked)
        pages["honeypot" if kinds[code] == "honeypot" else "other"].add(masked)
        at.button(key="skip").click().run()
        assert not at.exception, at.exception
    assert pages["honeypot"] and pages["honeypot"] <= pages["other"], pages["honeypot"]
    # the table is in code order, not batch order (which would put the honeypots last)
    codes = list(at.dataframe[0].value["candidate"])
    assert codes == sorted(codes) and len(codes) == 10


def test_a_missing_index_or_a_locked_catalog_reads_as_a_message(ws, monkeypatch):
    """C.16: a missing `index/` or a catalog locked past the busy timeout was an exception in
    the page (a raw traceback, before showErrorDetails was turned off); each is one message
    that says what to do, and a vote that could not be written says nothing was recorded."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import pipeline.catalog
    from reviewer_app.views import open_ws

    at = log_in(app(), "ann", PW)
    # another process holds the write lock; the app's connections wait 0.2 s, not 30
    monkeypatch.setattr(pipeline.catalog, "BUSY_TIMEOUT_MS", 200)
    open_ws(str(ws)).engine.dispose()
    holder = sqlite3.connect(ws / "catalog.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        at.button(key="accept").click().run()
    finally:
        holder.rollback()
        holder.close()
    assert not at.exception, at.exception
    said = [c.value for c in at.caption]
    assert any("busy" in c and "nothing recorded" in c.lower() for c in said), said
    assert decisions(ws)[0] == []

    def locked(*args, **kwargs):
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    with monkeypatch.context() as m:  # a read that fails the same way (the script's own)
        m.setattr(pipeline.catalog, "read_session", locked)
        at.run()
    assert not at.exception, at.exception
    assert any("busy" in w.value for w in at.warning)
    shutil.rmtree(ws / "index")
    at = log_in(app(), "ann", PW)
    assert not at.exception, at.exception
    assert any("pipeline index" in e.value for e in at.error)


def test_a_stale_second_tab_cannot_replace_a_newer_vote(ws):
    """C.15: two tabs of one reviewer on the same candidate; the newer accepts, then the stale
    one's reject replaced the accept silently. It is refused, and the page says why."""
    old, new = log_in(app(), "ann", PW), log_in(app(), "ann", PW)
    assert old.subheader[0].value == new.subheader[0].value
    new.button(key="accept").click().run()
    old.button(key="reason_3").click().run()
    assert [r[1] for r in decisions(ws)[0]] == ["accept"]
    assert any("already accepted" in c.value for c in old.caption)


def test_admins_see_cases_withdrawn_after_release(ws):
    """D.19: a case released and then no longer accepted is listed for admins."""
    at = log_in(app(), "ann", PW)
    at.button(key="accept").click().run()
    out = run(
        "export", "-w", ws, "--out", ws.parent / "rel", "--accept-failed-gate", "a test",
        "--allow-derived-anatomy", "phantom people",
    )  # fmt: skip
    assert out.exit_code == 0, out.stderr
    at.button(key="undo").click().run()
    admin = log_in(app(), "boss", PW)
    said = " ".join(m.value for m in admin.markdown)
    assert "1 case(s) withdrawn after release" in said
    assert "withdrawn after release: Dataset500\\_CardiacSynth case\\_0000" in said
    plain = " ".join(m.value for m in log_in(app(), "ann", PW).markdown)
    assert "withdrawn" not in plain


def test_a_volume_case_is_reviewed_in_three_planes_and_decided_whole(ws):
    """Issue 25, item 3: a volume case is one page — a slice slider, the axial slice with the
    coronal and sagittal planes in the same window, the current slice's nearest sources — and
    one decision covers every slice."""
    gen = run(
        "generate", "-w", ws, "--run", "r", "--volumes", "--count", 1, "--batch-name", "vol",
        "--filter", "--features", "pixel",
    )  # fmt: skip
    assert gen.exit_code in (0, 1), gen.stderr
    w = open_workspace(ws, create=False)
    with write_session(w.engine) as s:
        rows = s.scalars(select(Candidate).order_by(Candidate.id)).all()
        case = [c.id for c in rows if c.batch.name == "vol"]
        for c in rows:  # only the case left to review
            c.flagged = c.batch.name != "vol"
    w.close()
    assert len(case) > 2
    at = log_in(app(), "ann", PW)
    assert markdown_text(f"({len(case)} slices)") in at.subheader[0].value
    slider = at.slider(key=f"case_z_{case[0]}")
    assert slider.value == len(case) // 2
    pictures = " ".join(h.proto.body for h in at.get("html"))
    assert 'alt="coronal' in pictures and 'alt="sagittal' in pictures
    slider.set_value(1).run()
    assert not at.exception, at.exception
    at.button(key="accept").click().run()
    votes, _ = decisions(ws)
    assert sorted(r[0] for r in votes) == sorted(case) and {r[1] for r in votes} == {"accept"}
    assert at.success[0].value == "Nothing left for you to review."
    # (undoing a case vote whole: tests/test_release.py::test_a_volume_case_is_reviewed_as_one)


def test_case_planes_keep_true_proportions_and_mark_every_slice():
    """The coronal and sagittal planes are drawn at the axial picture's pixels per mm (the
    slice axis at its true length), head up, and every slice — also one a thinned slice axis
    skips — gets its marker, higher for a slice nearer the head."""
    import numpy as np

    from reviewer_app.views import CandidateView, case_planes

    depth, side = 32, 64
    views = []
    for _ in range(depth):
        mask = np.zeros((side, side), np.uint8)
        mask[20:40, 24:44] = 1
        views.append(
            CandidateView(
                units="HU",
                window=(-1024.0, 2048.0),
                unit=np.full((side, side), 0.4, np.float32),
                mask=mask,
                class_names=["background", "myocardium"],
                provenance={},
                filtered={},
                spacing=(5.9375, 5.9375, 5.0),
            )
        )
    axial = views[0].picture("soft tissue", False)
    zoom = axial.shape[0] // side
    heights = []
    for z in range(depth):
        coronal, sagittal = case_planes(views, z, "soft tissue", False)
        assert coronal.shape == sagittal.shape
        assert coronal.shape[1] == axial.shape[1]
        assert coronal.shape[0] == round(depth * 5.0 / 5.9375) * zoom  # 160 mm tall, not 190
        yellow = np.flatnonzero((coronal == (255, 215, 0)).all(axis=2).all(axis=1))
        assert len(yellow), z
        heights.append(yellow[0])
    assert heights == sorted(heights, reverse=True) and heights[0] > heights[-1]
