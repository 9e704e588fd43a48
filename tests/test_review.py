"""Review rules on a real tmp_path SQLite catalog: accounts, login limits, policy, undo, queue,
honeypots, import/export, and two processes writing decisions at once."""

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.catalog import (
    Candidate,
    CandidateBatch,
    Decision,
    LoginEvent,
    Reviewer,
    Run,
    read_session,
    utcnow,
    write_session,
)
from pipeline.decisions import candidate_states, derive_state
from pipeline.errors import PipelineError
from pipeline.review import (
    MAX_FAILED,
    add_reviewer,
    authenticate,
    decision_log,
    hash_password,
    import_decisions,
    log_csv,
    login,
    progress,
    queue,
    record_decision,
    reviewer_stats,
    undo_last,
    verify_password,
)
from pipeline.workspace import open_workspace

PW = "correct horse"


def make_batch(session, name, flags, *, kind="augmented"):
    """A batch of candidates with the given flags (True/False/None), without any model."""
    run = session.scalar(select(Run).where(Run.name == "r"))
    if run is None:
        run = Run(name="r", preset="tiny", config={}, generator_sha256="0" * 64)
        session.add(run)
        session.flush()
    batch = CandidateBatch(
        name=name, run_id=run.id, generator_sha256="0" * 64, masks=kind, config={}, units="HU"
    )
    session.add(batch)
    session.flush()
    ids = []
    for i, flag in enumerate(flags):
        c = Candidate(
            batch_id=batch.id,
            index=i,
            name=f"cand_{i:05d}",
            mask_source=kind,
            transform={},
            seed=0,
            spacing=[1, 1, 1],
            flagged=flag,
        )
        session.add(c)
        session.flush()
        ids.append(c.id)
    return ids


@pytest.fixture
def engine(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    yield ws.engine
    ws.close()


def test_password_hashing():
    stored = hash_password(PW)
    assert stored.startswith("scrypt$") and PW not in stored
    assert verify_password(PW, stored) and not verify_password("wrong horse", stored)
    assert hash_password(PW) != stored  # fresh salt each time
    with pytest.raises(PipelineError, match="at least 8"):
        hash_password("short")


def test_login_is_logged_and_rate_limited(engine):
    with write_session(engine) as s:
        add_reviewer(s, "ann", "reviewer", PW)
    assert login(engine, "ann", PW)["role"] == "reviewer"
    for _ in range(MAX_FAILED):
        with pytest.raises(PipelineError, match="wrong name or password"):
            login(engine, "ann", "nope nope")
    with pytest.raises(PipelineError, match="too many failed logins"):
        login(engine, "ann", PW)  # even the right password, while locked
    with write_session(engine) as s:  # after the window it works again
        assert authenticate(s, "ann", PW, now=utcnow() + timedelta(minutes=6)).name == "ann"
    with read_session(engine) as s:
        events = s.scalars(select(LoginEvent).order_by(LoginEvent.id)).all()
        assert [e.ok for e in events] == [True] + [False] * (MAX_FAILED + 1) + [True]
        assert events[-2].reason == "rate limited"
    with pytest.raises(PipelineError, match="wrong name or password"):
        login(engine, "nobody", PW)  # same message: does not tell which names exist


def test_policy_states():
    assert derive_state(True, 3, 0, "one") == "flagged"
    assert derive_state(False, 1, 0, "one") == "accepted"
    assert derive_state(False, 1, 0, "two") == "needs-second"
    assert derive_state(False, 2, 0, "two") == "accepted"
    assert derive_state(False, 1, 1, "one") == "disagreement"
    assert derive_state(False, 0, 1, "two") == "rejected"
    assert derive_state(False, 0, 0, "two") == "unreviewed"
    with pytest.raises(PipelineError, match="unknown review policy"):
        derive_state(False, 0, 0, "three")


def test_decisions_undo_queue_and_flag_rules(engine):
    with write_session(engine) as s:
        ids = make_batch(s, "b", [False, False, True, None])
        ann_id = add_reviewer(s, "ann", "reviewer", PW).id
        bob_id = add_reviewer(s, "bob", "reviewer", PW).id
    with write_session(engine) as s:
        ann, bob = s.get(Reviewer, ann_id), s.get(Reviewer, bob_id)
        # flagged and unfiltered candidates are never in the queue
        assert [q.id for q in queue(s, ann, policy="one")] == ids[:2]
        with pytest.raises(PipelineError, match="cannot be accepted"):
            record_decision(s, ann, ids[2], "accept")
        with pytest.raises(PipelineError, match="privacy filter"):
            record_decision(s, ann, ids[3], "accept")
        with pytest.raises(PipelineError, match="needs a reason"):
            record_decision(s, ann, ids[0], "reject")
        record_decision(s, ann, ids[0], "accept")
        record_decision(s, ann, ids[1], "reject", reason="artefact")
        states = {c.id: c.state for c in candidate_states(s, policy="two")}
        assert states == {ids[0]: "needs-second", ids[1]: "rejected", ids[2]: "flagged"}
        # bob sees the candidate ann accepted; the one she rejected is final and gone
        assert [q.id for q in queue(s, bob, policy="two")] == [ids[0]]
        record_decision(s, bob, ids[0], "accept")
        assert {c.id: c.state for c in candidate_states(s, policy="two")}[ids[0]] == "accepted"
        # undo: ann's last decision (the reject) is undone, the candidate returns to her queue
        undo = undo_last(s, ann)
        assert undo.decision == "undo" and s.get(Decision, undo.undoes_id).decision == "reject"
        assert ids[1] in [q.id for q in queue(s, ann, policy="one")]
        assert progress(s, ann, policy="one", admin=True) == {"total": 2, "mine": 1, "overall": 1}
        # a plain reviewer gets everyone's vote count instead of the decided count
        assert progress(s, ann, policy="one", admin=False) == {"total": 2, "mine": 1, "votes": 2}
        undo_last(s, ann)
        assert undo_last(s, ann) is None  # nothing left to undo
        # nothing was overwritten: 4 decisions + 2 undos, append-only
        assert s.scalar(select(func.count()).select_from(Decision)) == 5
        log = decision_log(s)
        assert [r["decision"] for r in log] == ["accept", "reject", "accept", "undo", "undo"]
        assert log_csv(log).splitlines()[0].startswith("id,time,candidate,batch,name,reviewer")


def test_disagreement_and_honeypot_stats(engine):
    with write_session(engine) as s:
        ids = make_batch(s, "b", [False, False])
        hp = make_batch(s, "hp", [None, None], kind="honeypot")
        ann = add_reviewer(s, "ann", "admin", PW)
        bob = add_reviewer(s, "bob", "reviewer", PW)
        record_decision(s, ann, ids[0], "accept")
        record_decision(s, bob, ids[0], "reject", reason="artefact")
        record_decision(s, bob, ids[1], "accept")
        record_decision(s, ann, ids[1], "accept")
        record_decision(s, ann, hp[0], "reject", reason="too similar to a source scan")
        record_decision(s, ann, hp[1], "reject", reason="too similar to a source scan")
        record_decision(s, bob, hp[0], "accept")  # missed a honeypot
        states = {c.id: c for c in candidate_states(s, policy="one")}
        assert states[ids[0]].state == "disagreement"
        assert states[hp[0]].honeypot and not states[hp[0]].flagged  # unmarked in the queue
        stats = {r["reviewer"]: r for r in reviewer_stats(s)}
        assert stats["ann"]["honeypot_catch_rate"] == 1.0 and stats["ann"]["honeypots_seen"] == 2
        assert stats["bob"]["honeypot_catch_rate"] == 0.0
        assert stats["ann"]["agreement"] == pytest.approx(1 / 3)  # ids[0] no, ids[1] yes, hp[0] no


def test_import_is_all_or_nothing(engine):
    with write_session(engine) as s:
        ids = make_batch(s, "b", [False, False, True])
        ann_id = add_reviewer(s, "ann", "reviewer", PW).id
    bad = f"candidate,decision,reason\n{ids[0]},accept,\n{ids[2]},accept,\n{ids[1]},maybe,\n"
    with write_session(engine) as s, pytest.raises(PipelineError) as err:
        import_decisions(s, s.get(Reviewer, ann_id), bad)
    assert "line 3" in str(err.value) and "line 4" in str(err.value)
    with read_session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Decision)) == 0
    good = f"candidate,decision,reason\n{ids[0]},accept,\n{ids[1]},reject,artefact\n"
    with write_session(engine) as s:
        assert import_decisions(s, s.get(Reviewer, ann_id), good) == 2
    with read_session(engine) as s:
        assert all(d.imported for d in s.scalars(select(Decision)))


WRITER = """
import sys
from pipeline.catalog import Reviewer, write_session
from pipeline.review import record_decision
from pipeline.workspace import open_workspace
ws = open_workspace(sys.argv[1], create=False)
ids = [int(x) for x in sys.argv[3].split(",")]
for i in range(500):
    with write_session(ws.engine) as s:
        record_decision(s, s.get(Reviewer, int(sys.argv[2])), ids[i % len(ids)], "accept")
ws.close()
"""


@pytest.mark.slow
def test_two_processes_500_decisions_each(tmp_path):
    ws = open_workspace(tmp_path / "ws")
    with write_session(ws.engine) as s:
        ids = make_batch(s, "b", [False] * 50)
        who = [add_reviewer(s, n, "reviewer", PW).id for n in ("ann", "bob")]
    ws.close()
    root = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / "ws"), str(r), ",".join(map(str, ids))],
            stderr=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"},
        )
        for r in who
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert not any("locked" in e for e in errors)
    ws = open_workspace(tmp_path / "ws", create=False)
    with read_session(ws.engine) as s:
        per = dict(
            s.execute(
                select(Decision.reviewer_id, func.count()).group_by(Decision.reviewer_id)
            ).all()
        )
    ws.close()
    assert per == {who[0]: 500, who[1]: 500}


def test_second_reading_is_blind(engine):
    from pipeline.review import review_code, review_key, visible_state

    with write_session(engine) as s:
        ids = make_batch(s, "b", [False, False, False])
        ann = add_reviewer(s, "ann", "reviewer", PW)
        bob = add_reviewer(s, "bob", "reviewer", PW)
        cat = add_reviewer(s, "cat", "reviewer", PW)
        boss = add_reviewer(s, "boss", "admin", PW)
        key = review_key(s)
        before = [q.id for q in queue(s, bob, policy="two")]
        record_decision(s, ann, ids[2], "accept")  # the last one: it must not jump the queue
        assert [q.id for q in queue(s, bob, policy="two")] == before == ids

        def seen(who, cid, admin=False):
            states = {c.id: c for c in candidate_states(s, policy="two")}
            return visible_state(states[cid], viewer_id=who.id, admin=admin, key=key)

        assert seen(bob, ids[2]) == {
            "candidate": review_code(key, ids[2]),  # no batch, name or id: they mark honeypots
            "state": "open",
            "accepted by": "",
            "rejected by": "",
        }
        assert seen(ann, ids[2])["state"] == "you accepted"
        full = seen(boss, ids[2], admin=True)
        assert full["state"] == "needs-second" and full["accepted by"] == "ann"
        assert full["batch"] == "b" and full["code"] == review_code(key, ids[2])
        record_decision(s, bob, ids[2], "accept")  # accepted now
        # the voters see their own votes only (the state would tell them the other's vote,
        # and they could undo and vote again knowing); the others see it as open
        assert seen(bob, ids[2])["state"] == "you accepted"
        assert seen(bob, ids[2])["accepted by"] == ""
        assert seen(cat, ids[2])["state"] == "open"
        assert seen(boss, ids[2], admin=True)["accepted by"] == "ann, bob"
        # out of one's reach (rejected by others, no vote of one's own): shown with names
        record_decision(s, ann, ids[0], "reject", reason="artefact")
        assert seen(cat, ids[0]) | {"candidate": ""} == {
            "candidate": "",
            "state": "rejected",
            "accepted by": "",
            "rejected by": "ann",
        }
        assert review_code(key, ids[0]) != review_code(key, ids[1])


def test_volume_cases_are_read_one_way():
    """A volume slice's case, z and depth come from one validated parser: rows group into cases
    in z order, and a row without its position or a case holding a z twice is one clear error
    (the export, the evaluation and the review queue all read cases through it)."""
    from pipeline.candidates import case_position, group_cases

    rows = [
        {"case": 1, "z": 1, "depth": 2},
        {"case": 0, "z": 1, "depth": 2},
        {"case": 1, "z": 0, "depth": 2},
        {"case": 0, "z": 0, "depth": 2},
    ]
    assert group_cases(rows) == {0: [3, 1], 1: [2, 0]}
    assert case_position({"case": "3", "z": 0, "depth": 4}) == {"case": 3, "z": 0, "depth": 4}
    for bad in ({"case": 0, "z": 0}, None, {"case": "x", "z": 0, "depth": 1}):
        with pytest.raises(PipelineError, match="lacks its case, z or depth"):
            group_cases([bad])
    with pytest.raises(PipelineError, match="volume case 0 holds a slice position twice"):
        group_cases([{"case": 0, "z": 0, "depth": 2}, {"case": 0, "z": 0, "depth": 2}])
