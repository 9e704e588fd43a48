"""Physician review: accounts, login with rate limiting, append-only decisions, the queue.

Business rules of the review stage live here (the Streamlit app and the CLI call them): who may
log in, what a decision may be, what a reviewer may see, the queue order, undo, honeypots, the
audit export and imports. How a candidate's state follows from the decision log is
``pipeline.decisions`` (export needs it too). Functions take a SQLAlchemy ``Session``; the
caller owns the transaction.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline import __version__
from pipeline.candidates import case_position, group_cases
from pipeline.catalog import (
    Candidate,
    CandidateBatch,
    Decision,
    LoginEvent,
    Reviewer,
    get_meta,
    read_session,
    utcnow,
    write_session,
)
from pipeline.decisions import CandidateState, candidate_states, effective_decisions
from pipeline.errors import PipelineError
from pipeline.validate import csv_cell, csv_uncell, reviewer_name

ROLES = ("reviewer", "admin", "demo")
REJECT_REASONS = (
    "too similar to a source scan",
    "anatomically implausible",
    "artefact",
    "does not match the mask",
    "poor image quality",
    "other",
)
#: Failed logins per name inside the window before further attempts are refused.
MAX_FAILED = 5
LOCK_WINDOW = timedelta(minutes=5)
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$n$r$p$salt$hash`` (hex) of a password with a fresh 16-byte salt."""
    if len(password) < 8:
        raise PipelineError("passwords need at least 8 characters")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against :func:`hash_password`'s output."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if kind != "scrypt":
        return False
    got = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), dklen=32, n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(got.hex(), digest)


def add_reviewer(session: Session, name: str, role: str, password: str) -> Reviewer:
    """Create an account; names are canonical (:func:`reviewer_name`) and unique."""
    name = reviewer_name(name)
    if role not in ROLES:
        raise PipelineError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if session.scalar(select(Reviewer).where(Reviewer.name == name)) is not None:
        raise PipelineError(f"reviewer {name!r} already exists")
    row = Reviewer(name=name, role=role, password_hash=hash_password(password))
    session.add(row)
    session.flush()
    return row


def demo_account(session: Session, name: str, password: str) -> Reviewer:
    """An admin account for a demo, created, or (an earlier demo's admin account) given
    ``password`` anew. A disabled account is never re-enabled and an account of another role
    is never touched: an administrator's decision, or a real reviewer's login, is not the
    demo's to undo."""
    row = _by_name(session, name)
    if row is None:
        return add_reviewer(session, name, "admin", password)
    if row.disabled:
        raise PipelineError(
            f"account {row.name!r} is disabled; the demo will not re-enable it (an "
            "administrator disabled it): enable it with 'pipeline reviewers' or remove it"
        )
    if row.role != "admin":
        raise PipelineError(
            f"account {row.name!r} exists as a {row.role}, not the demo's admin account; the "
            "demo will not take it over"
        )
    row.password_hash = hash_password(password)
    return row


def get_reviewer(session: Session, name: str) -> Reviewer:
    """An account by name (any case), or a clear error."""
    row = _by_name(session, name)
    if row is None:
        raise PipelineError(f"no reviewer {name!r}")
    return row


def _by_name(session: Session, name: str) -> Reviewer | None:
    """The account a typed name means: canonical form, matched case-insensitively (accounts
    made before names were canonical keep working)."""
    try:
        canonical = reviewer_name(name)
    except PipelineError:
        return None
    return session.scalar(select(Reviewer).where(func.lower(Reviewer.name) == canonical))


#: Verified against for unknown names, so a login takes as long whether or not the name exists.
_DUMMY_HASH = hash_password("not-a-password", salt=b"\0" * 16)


def disable_reviewer(session: Session, name: str) -> None:
    """Disable an account (its decisions stay; it can no longer log in or decide)."""
    get_reviewer(session, name).disabled = True


def list_reviewers(session: Session) -> list[dict[str, Any]]:
    """Accounts with their decision counts (never the hashes)."""
    counts = dict(
        session.execute(
            select(Decision.reviewer_id, func.count())
            .where(Decision.decision != "undo")
            .group_by(Decision.reviewer_id)
        ).all()
    )
    return [
        {
            "name": r.name,
            "role": r.role,
            "disabled": r.disabled,
            "decisions": counts.get(r.id, 0),
            "created_at": r.created_at.isoformat(),
        }
        for r in session.scalars(select(Reviewer).order_by(Reviewer.name))
    ]


def authenticate(
    session: Session, name: str, password: str, *, now: datetime | None = None
) -> Reviewer:
    """Check a login; every attempt is logged. After ``MAX_FAILED`` failures for a name within
    ``LOCK_WINDOW`` further attempts are refused until the window has passed. The error never
    says whether the name exists."""
    now = now or utcnow()
    since = now - LOCK_WINDOW
    try:  # the lockout counts per canonical name: 'Bob ' and 'bob' share one window
        name = reviewer_name(name)
    except PipelineError:
        name = " ".join(name.split())[:64]
    failed = session.scalar(
        select(func.count())
        .select_from(LoginEvent)
        .where(LoginEvent.name == name, LoginEvent.ok.is_(False), LoginEvent.created_at >= since)
    )
    if failed >= MAX_FAILED:
        session.add(LoginEvent(name=name, ok=False, reason="rate limited", created_at=now))
        raise PipelineError("too many failed logins; wait a few minutes and try again")
    row = _by_name(session, name)
    # always one scrypt: an unknown name must not answer faster than a wrong password
    matches = verify_password(password, row.password_hash if row is not None else _DUMMY_HASH)
    ok = row is not None and not row.disabled and matches
    reason = "" if ok else ("disabled" if row is not None and row.disabled else "bad credentials")
    session.add(LoginEvent(name=name, ok=ok, reason=reason, created_at=now))
    if not ok:
        raise PipelineError("wrong name or password")
    return row


def review_key(session: Session) -> bytes:
    """The workspace's secret for :func:`review_code` (made when the catalog is created)."""
    value = get_meta(session, "review_key")
    if value is None:
        raise PipelineError("the catalog has no review key; open it with this version first")
    return bytes.fromhex(value)


def review_code(key: bytes, candidate_id: int) -> str:
    """What a plain reviewer calls a candidate: 8 hex characters keyed by the workspace's
    secret. Batch names, candidate names and ids would mark honeypots (their own batch, ids
    added after the batch they hide in); a keyed code says nothing of either."""
    digest = hmac.new(key, str(candidate_id).encode(), hashlib.sha256).hexdigest()
    return digest[:8]


def visible_state(s: CandidateState, *, viewer_id: int, admin: bool, key: bytes) -> dict[str, Any]:
    """One candidate as a reviewer may see it; the rule is written once for every view.

    Admins see everything. A plain reviewer sees a keyed code for the candidate (never its
    batch, name or id: they would mark honeypots), and:

    * their own vote, while they have one in effect ("you accepted" / "you rejected") and
      nothing else: the state that follows from their vote would tell them the others'
      (under policy two a reject beside an accept is a disagreement, a lone reject is
      final), and they could undo and vote again knowing it;
    * "rejected" or "flagged" with the names, once the candidate is out of their reach (no
      vote of theirs, and nothing left to judge);
    * "open" otherwise, an accepted candidate included: it is still in their queue, and
      others' accepts must not lead their reading.
    """
    if admin:
        return {
            "id": s.id,
            "code": review_code(key, s.id),
            "batch": s.batch,
            "candidate": s.name,
            "state": s.state,
            "accepted by": ", ".join(s.accepts),
            "rejected by": ", ".join(s.rejects),
        }
    accepts: list[str] = []
    rejects: list[str] = []
    if viewer_id in s.decided_by:
        state = f"you {s.votes[viewer_id]}ed"
    elif s.state in ("rejected", "flagged"):
        state, accepts, rejects = s.state, s.accepts, s.rejects
    else:
        state = "open"
    return {
        "candidate": review_code(key, s.id),
        "state": state,
        "accepted by": ", ".join(accepts),
        "rejected by": ", ".join(rejects),
    }


#: Provenance every candidate shares with a honeypot, so a plain reviewer may see it.
SHARED_PROVENANCE = ("run", "generator_sha256")


def visible_provenance(provenance: dict[str, Any], *, admin: bool, code: str) -> dict[str, Any]:
    """A candidate's provenance as a reviewer may see it: everything for admins; for everyone
    else the review code and what every image in the queue shares (its batch, mask source,
    source slice, transform and creation time would mark a honeypot)."""
    if admin:
        return {"review code": code, **provenance}
    return {"candidate": code, **{k: provenance[k] for k in SHARED_PROVENANCE if k in provenance}}


def case_keys(session: Session) -> dict[int, tuple[int, int]]:
    """candidate id → (batch id, case) for every slice of a volume batch (``generate
    --volumes``): those slices are judged as whole cases."""
    volume_batches = [
        b.id for b in session.scalars(select(CandidateBatch)) if (b.config or {}).get("volumes")
    ]
    if not volume_batches:
        return {}
    rows = session.execute(
        select(Candidate.id, Candidate.batch_id, Candidate.transform).where(
            Candidate.batch_id.in_(volume_batches)
        )
    )
    return {cid: (bid, case_position(t)["case"]) for cid, bid, t in rows}


def case_slices(session: Session, candidate_id: int) -> list[int]:
    """The candidates judged together with this one: every slice of its volume case in z
    order, or just itself (a loose slice)."""
    row = session.get(Candidate, candidate_id)
    if row is None:
        raise PipelineError(f"no candidate {candidate_id}")
    if not (row.batch.config or {}).get("volumes"):
        return [candidate_id]
    case = case_position(row.transform)["case"]
    rows = session.execute(
        select(Candidate.id, Candidate.transform).where(Candidate.batch_id == row.batch_id)
    ).all()
    return [rows[i][0] for i in group_cases([t for _, t in rows])[case]]


def record_case_decision(
    session: Session,
    reviewer: Reviewer,
    candidate_id: int,
    decision: str,
    *,
    reason: str = "",
    if_undecided: bool = False,
) -> list[Decision]:
    """One accept / reject on the whole case of ``candidate_id`` (:func:`case_slices`): a vote
    on every slice, all in the caller's transaction, so a refusal on any slice (flagged, a
    vote already in effect) records nothing. For a loose slice, :func:`record_decision`."""
    members = case_slices(session, candidate_id)
    if decision == "accept" and len(members) > 1:
        flagged = [
            z for z, cid in enumerate(members) if session.get(Candidate, cid).flagged is not False
        ]
        if flagged:
            raise PipelineError(
                f"slice {flagged[0]} of this case is flagged too similar (or not filtered): "
                "the case cannot be accepted"
            )
    return [
        record_decision(session, reviewer, cid, decision, reason=reason, if_undecided=if_undecided)
        for cid in members
    ]


def queue(
    session: Session,
    reviewer: Reviewer,
    *,
    policy: str,
    states: list[CandidateState] | None = None,
) -> list[CandidateState]:
    """What this reviewer still has to judge, by batch and index: the order never depends on
    other reviewers' votes, so a second reader cannot tell which candidates a first reader
    accepted (blind double reading). Honeypots sit in the same order, unmarked. Flagged and
    rejected candidates are never in the queue. ``states``: the current
    :func:`candidate_states`, when the caller has them already."""
    if states is None:
        states = candidate_states(session, policy=policy)
    todo = [
        s
        for s in states
        if not s.flagged and reviewer.id not in s.decided_by and s.state != "rejected"
    ]
    # a volume case is judged whole: offered once (its first slice stands for it) while no
    # slice of it is flagged and this reviewer has not voted on it
    cases = case_keys(session)
    if cases:
        by_id = {s.id: s for s in states}
        members: dict[tuple[int, int], list[int]] = {}
        for cid, key in cases.items():
            members.setdefault(key, []).append(cid)
        closed = {
            key
            for key, ids in members.items()
            if any(
                by_id[i].flagged or reviewer.id in by_id[i].decided_by for i in ids if i in by_id
            )
        }
        first = {key: min(ids) for key, ids in members.items()}
        todo = [
            s
            for s in todo
            if s.id not in cases or (cases[s.id] not in closed and first[cases[s.id]] == s.id)
        ]
    regular = sorted((s for s in todo if not s.honeypot), key=lambda s: (s.batch, s.name))
    honeypots = [s for s in todo if s.honeypot]
    # spread honeypots through the queue at positions fixed per reviewer, not at its end
    rng = random.Random(f"{reviewer.id}:{len(regular)}")
    for hp in honeypots:
        regular.insert(rng.randint(min(1, len(regular)), len(regular)), hp)
    return regular


def record_decision(
    session: Session,
    reviewer: Reviewer,
    candidate_id: int,
    decision: str,
    *,
    reason: str = "",
    imported: bool = False,
    if_undecided: bool = False,
    app_version: str = __version__,
) -> Decision:
    """Append one accept / reject. A flagged candidate can never be accepted; a disabled
    reviewer cannot decide; a reject needs a reason; a reason holds at most ``MAX_FIELD``
    characters. ``if_undecided`` (the app): refuse when this reviewer already has a vote in
    effect on the candidate, so a stale page (a second tab) cannot replace a newer vote; a
    change of mind is an undo, then a vote."""
    if decision not in ("accept", "reject"):
        raise PipelineError(f"decision must be accept or reject, not {decision!r}")
    if reviewer.disabled:
        raise PipelineError(f"reviewer {reviewer.name!r} is disabled")
    row = session.get(Candidate, candidate_id)
    if row is None:
        raise PipelineError(f"no candidate {candidate_id}")
    honeypot = row.batch.masks == "honeypot"
    if not honeypot and row.flagged is None:
        raise PipelineError(f"candidate {candidate_id} has not been through the privacy filter")
    if decision == "accept" and row.flagged and not honeypot:
        raise PipelineError(
            f"candidate {candidate_id} is flagged too similar: it cannot be accepted"
        )
    if decision == "reject" and not reason.strip():
        raise PipelineError("a reject needs a reason")
    if len(reason) > MAX_FIELD:  # the same bound as an imported field (a note is not a file)
        raise PipelineError(f"a reason or note is limited to {MAX_FIELD:,} characters")
    if if_undecided:
        mine = effective_decisions(session, candidate_id=candidate_id).get(candidate_id, {})
        if reviewer.id in mine:
            raise PipelineError(
                f"you already {mine[reviewer.id].decision}ed this candidate (in another tab or "
                "window?); nothing recorded. To change it, undo it first"
            )
    d = Decision(
        candidate_id=candidate_id,
        reviewer_id=reviewer.id,
        decision=decision,
        reason=reason.strip(),
        imported=imported,
        app_version=app_version,
    )
    session.add(d)
    session.flush()
    return d


def undo_last(session: Session, reviewer: Reviewer) -> Decision | None:
    """Append an undo of this reviewer's latest decision that is still in effect (None if
    there is nothing to undo). Only one's own decisions can be undone; a disabled reviewer
    can undo nothing. A case vote (:func:`record_case_decision`) is undone on every slice."""
    if reviewer.disabled:
        raise PipelineError(f"reviewer {reviewer.name!r} is disabled")
    undone = set(session.scalars(select(Decision.undoes_id).where(Decision.undoes_id.is_not(None))))
    last = session.scalars(
        select(Decision)
        .where(Decision.reviewer_id == reviewer.id, Decision.decision != "undo")
        .order_by(Decision.id.desc())
    )
    target = next((d for d in last if d.id not in undone), None)
    if target is None:
        return None
    # a case vote was one vote on every slice: it is taken back whole
    others = sorted(set(case_slices(session, target.candidate_id)) - {target.candidate_id})
    mine = effective_decisions(session) if others else {}  # a loose slice: no log scan
    targets = [target] + [
        d for cid in others for rid, d in mine.get(cid, {}).items() if rid == reviewer.id
    ]
    undos = [
        Decision(
            candidate_id=t.candidate_id,
            reviewer_id=reviewer.id,
            decision="undo",
            undoes_id=t.id,
            app_version=__version__,
        )
        for t in targets
    ]
    session.add_all(undos)
    session.flush()
    return undos[0]


def progress(
    session: Session,
    reviewer: Reviewer,
    *,
    policy: str,
    admin: bool,
    states: list[CandidateState] | None = None,
) -> dict[str, int]:
    """'n of N reviewed' for this reviewer, and how far everyone is (flagged candidates
    excluded). Admins get ``overall``, the candidates decided under the policy; a plain
    reviewer gets ``votes``, the votes everyone has cast: their own vote moves it by one
    whatever others did, while the decided count would move by one or by none and so tell
    them whether someone else had voted the other way."""
    if states is None:
        states = candidate_states(session, policy=policy)
    open_ = [s for s in states if not s.flagged]
    mine = sum(reviewer.id in s.decided_by for s in open_)
    out = {"total": len(open_), "mine": mine}
    if admin:
        out["overall"] = sum(s.state in ("accepted", "rejected") for s in open_)
    else:
        out["votes"] = sum(len(s.decided_by) for s in open_)
    return out


def reviewer_stats(session: Session) -> list[dict[str, Any]]:
    """Admin view: per reviewer accepts, rejects, agreement with others, honeypot catch rate."""
    current = effective_decisions(session)
    honeypots = set(
        session.scalars(
            select(Candidate.id).join(CandidateBatch).where(CandidateBatch.masks == "honeypot")
        )
    )
    out = []
    for r in session.scalars(select(Reviewer).order_by(Reviewer.name)):
        acc = rej = agree = compared = hp_seen = hp_caught = 0
        for cid, by in current.items():
            d = by.get(r.id)
            if d is None:
                continue
            acc += d.decision == "accept"
            rej += d.decision == "reject"
            if cid in honeypots:
                hp_seen += 1
                hp_caught += d.decision == "reject"
            for other_id, other in by.items():
                if other_id != r.id:
                    compared += 1
                    agree += other.decision == d.decision
        out.append(
            {
                "reviewer": r.name,
                "accepts": acc,
                "rejects": rej,
                "agreement": agree / compared if compared else None,
                "honeypots_seen": hp_seen,
                "honeypot_catch_rate": hp_caught / hp_seen if hp_seen else None,
            }
        )
    return out


def decision_log(session: Session) -> list[dict[str, Any]]:
    """The full append-only log, oldest first (for audits)."""
    rows = session.execute(
        select(Decision, Reviewer.name, Candidate.name, CandidateBatch.name)
        .join(Reviewer, Decision.reviewer_id == Reviewer.id)
        .join(Candidate, Decision.candidate_id == Candidate.id)
        .join(CandidateBatch, Candidate.batch_id == CandidateBatch.id)
        .order_by(Decision.id)
    ).all()
    return [
        {
            "id": d.id,
            "time": d.created_at.astimezone(UTC).isoformat(),
            "candidate": d.candidate_id,
            "batch": batch,
            "name": cand,
            "reviewer": who,
            "decision": d.decision,
            "reason": d.reason,
            "undoes": d.undoes_id,
            "imported": d.imported,
            "app_version": d.app_version,
        }
        for d, who, cand, batch in rows
    ]


def log_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of :func:`decision_log` rows."""
    buf = io.StringIO()
    fields = ["id", "time", "candidate", "batch", "name", "reviewer", "decision", "reason"]
    fields += ["undoes", "imported", "app_version"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    # every cell neutralised: a reason like '=HYPERLINK(...)' must stay text in a spreadsheet
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


#: Bounds of an imported decision CSV: a few reviewers' work, not a denial of service.
MAX_IMPORT_BYTES = 10 * 2**20
MAX_IMPORT_ROWS = 100_000
MAX_FIELD = 4096
MAX_LISTED = 10


@dataclass(frozen=True)
class DecisionRow:
    """One parsed line of an imported decision CSV."""

    line: int
    candidate: int
    decision: str
    reason: str


def _refuse(problems: list[str]) -> PipelineError:
    shown = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return PipelineError(
        f"import refused, nothing recorded ({len(problems)} bad row(s)): {shown}{more}"
    )


def parse_decision_csv(text: str) -> tuple[list[DecisionRow], list[str]]:
    """Parse CSV text (columns candidate, decision, reason) within the import bounds: the
    well-formed rows and a problem line for each malformed one. No database involved."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_IMPORT_BYTES:
        raise PipelineError(f"CSV is larger than {MAX_IMPORT_BYTES // 2**20} MiB")
    # Excel's "CSV UTF-8" starts with a byte-order mark, which would glue onto the first column
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    rows: list[DecisionRow] = []
    problems: list[str] = []
    try:
        missing = {"candidate", "decision"} - set(reader.fieldnames or [])
        if missing:
            raise PipelineError(f"CSV lacks column(s) {', '.join(sorted(missing))}")
        for n, row in enumerate(reader, start=2):  # line numbers, header is line 1
            if len(rows) + len(problems) >= MAX_IMPORT_ROWS:
                raise PipelineError(f"CSV has more than {MAX_IMPORT_ROWS:,} rows; split it")
            values = [v for v in row.values() if isinstance(v, str)]
            if any(len(v) > MAX_FIELD for v in values):
                problems.append(f"line {n}: a field is longer than {MAX_FIELD} characters")
                continue
            decision = csv_uncell(row.get("decision") or "").strip().lower()
            try:
                candidate = int(csv_uncell(row.get("candidate") or ""))
            except ValueError:
                problems.append(f"line {n}: candidate is not a number")
                continue
            if decision not in ("accept", "reject"):
                problems.append(f"line {n}: decision must be accept or reject")
                continue
            reason = csv_uncell(row.get("reason") or "").strip()
            rows.append(DecisionRow(n, candidate, decision, reason))
    except csv.Error as exc:
        raise PipelineError(f"malformed CSV ({exc})") from None
    if not rows and not problems:
        raise PipelineError("CSV has no decisions")
    return rows, problems


def check_decisions(session: Session, reviewer: Reviewer, text: str) -> list[DecisionRow]:
    """The rows of a decision CSV, refusing (listing the bad lines) anything malformed or that
    :func:`record_decision` would refuse. Reads only: a bad file is turned away before anyone
    takes the catalog's write lock."""
    rows, problems = parse_decision_csv(text)
    if reviewer.disabled:
        raise PipelineError(f"reviewer {reviewer.name!r} is disabled")
    ids = sorted({r.candidate for r in rows})
    known: dict[int, tuple[bool | None, bool]] = {}
    for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
        for cid, flagged, masks in session.execute(
            select(Candidate.id, Candidate.flagged, CandidateBatch.masks)
            .join(CandidateBatch)
            .where(Candidate.id.in_(ids[i : i + 900]))
        ):
            known[cid] = (flagged, masks == "honeypot")
    for r in rows:
        if r.candidate not in known:
            problems.append(f"line {r.line}: no candidate {r.candidate}")
            continue
        flagged, honeypot = known[r.candidate]
        if not honeypot and flagged is None:
            problems.append(f"line {r.line}: candidate {r.candidate} is not filtered yet")
        elif r.decision == "accept" and flagged and not honeypot:
            problems.append(f"line {r.line}: candidate {r.candidate} is flagged too similar")
        elif r.decision == "reject" and not r.reason:
            problems.append(f"line {r.line}: a reject needs a reason")
    if problems:
        problems.sort(key=lambda p: int(p.split(":")[0].split()[1]))
        raise _refuse(problems)
    return rows


def import_decisions(session: Session, reviewer: Reviewer, text: str) -> int:
    """Record decisions from CSV text (columns candidate,decision,reason) as ``reviewer``,
    marked imported. All or nothing: any bad row fails the whole import, listing the rows.
    Values our own export neutralised for spreadsheets (a leading apostrophe) are read back."""
    rows = check_decisions(session, reviewer, text)
    whole = session.begin_nested()  # all or nothing, whatever the caller does with the error
    try:
        for r in rows:
            record_decision(
                session, reviewer, r.candidate, r.decision, reason=r.reason, imported=True
            )
    except PipelineError:
        whole.rollback()
        raise
    whole.commit()
    return len(rows)


def import_decision_file(engine: Any, reviewer_id: int, path: Path) -> int:
    """`decisions import`: read a CSV (bounded), check every row without the write lock (a bad
    file never blocks the app), then record all rows in one transaction. Errors name the file."""
    try:
        if path.stat().st_size > MAX_IMPORT_BYTES:
            raise PipelineError(f"CSV is larger than {MAX_IMPORT_BYTES // 2**20} MiB")
        text = path.read_text()
        with read_session(engine) as session:
            check_decisions(session, session.get(Reviewer, reviewer_id), text)
        with write_session(engine) as session:
            return import_decisions(session, session.get(Reviewer, reviewer_id), text)
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"unreadable CSV ({exc})", path=path) from None
    except PipelineError as exc:
        raise PipelineError(exc.message, path=path) from None


#: A logged-in session ends after this many idle seconds.
SESSION_IDLE_S = 30 * 60


def open_session_reviewer(
    session: Session, user_id: int | None, last_seen: float | None, now: float
) -> Reviewer | None:
    """The reviewer behind an app session if it may still act: logged in, active within
    ``SESSION_IDLE_S``, account present and enabled. Every write checks this first."""
    if user_id is None or last_seen is None or now - last_seen > SESSION_IDLE_S:
        return None
    row = session.get(Reviewer, user_id)
    return None if row is None or row.disabled else row


def login(engine: Any, name: str, password: str) -> dict[str, Any]:
    """:func:`authenticate` in its own transaction, committing the logged attempt even when
    the login fails. Returns the reviewer's id, name and role."""
    failure: PipelineError | None = None
    with write_session(engine) as session:
        try:
            row = authenticate(session, name, password)
            who = {"id": row.id, "name": row.name, "role": row.role}
        except PipelineError as exc:
            failure = exc
    if failure is not None:
        raise failure
    return who
