"""The review outcome: each candidate's current state, derived from the append-only decision log.

Shared ground of the review stage (which writes decisions) and the export (which releases only
what the policy calls accepted): the rule is written once, here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.catalog import Candidate, CandidateBatch, Decision, Reviewer, get_meta, set_meta
from pipeline.errors import PipelineError

POLICIES = ("one", "two")


def review_policy(session: Session) -> str:
    """The workspace's review policy (``one`` unless an admin set ``two``)."""
    return get_meta(session, "review_policy") or "one"


def set_review_policy(session: Session, policy: str) -> None:
    """Set the review policy (one of ``POLICIES``)."""
    if policy not in POLICIES:
        raise PipelineError(f"unknown review policy {policy!r}; choose one of {POLICIES}")
    set_meta(session, "review_policy", policy)


@dataclass
class CandidateState:
    """A candidate's current state, derived from the decision log."""

    id: int
    batch: str
    name: str
    flagged: bool
    honeypot: bool
    state: str  # flagged | unreviewed | accepted | rejected | disagreement | needs-second
    accepts: list[str] = field(default_factory=list)
    rejects: list[str] = field(default_factory=list)
    decisions: int = 0
    decided_by: list[int] = field(default_factory=list)  # reviewer ids with a decision in effect
    votes: dict[int, str] = field(default_factory=dict)  # reviewer id → accept | reject


def effective_decisions(
    session: Session, *, candidate_id: int | None = None
) -> dict[int, dict[int, Decision]]:
    """candidate id → reviewer id → that reviewer's current decision (undos applied); for
    one candidate only when ``candidate_id`` is given."""
    undos = select(Decision.undoes_id).where(Decision.undoes_id.is_not(None))
    votes = select(Decision).where(Decision.decision != "undo").order_by(Decision.id)
    if candidate_id is not None:
        undos = undos.where(Decision.candidate_id == candidate_id)
        votes = votes.where(Decision.candidate_id == candidate_id)
    undone = set(session.scalars(undos))
    current: dict[int, dict[int, Decision]] = defaultdict(dict)
    for d in session.scalars(votes):
        if d.id not in undone:  # an undone decision gives way to the one before it
            current[d.candidate_id][d.reviewer_id] = d  # later rows supersede earlier ones
    return current


def derive_state(flagged: bool, accepts: int, rejects: int, policy: str) -> str:
    """The review policy: ``one`` accept suffices, or ``two`` reviewers must accept; any
    reject against an accept is a disagreement for an admin; flagged is final."""
    if policy not in POLICIES:
        raise PipelineError(f"unknown review policy {policy!r}; choose one of {POLICIES}")
    if flagged:
        return "flagged"
    if accepts and rejects:
        return "disagreement"
    if rejects:
        return "rejected"
    if accepts >= (1 if policy == "one" else 2):
        return "accepted"
    return "needs-second" if accepts else "unreviewed"


def candidate_states(
    session: Session, *, policy: str, batch: str | None = None
) -> list[CandidateState]:
    """Every candidate of the filtered batches (or one batch) with its derived state."""
    names = dict(session.execute(select(Reviewer.id, Reviewer.name)).all())
    current = effective_decisions(session)
    stmt = select(Candidate, CandidateBatch).join(CandidateBatch)
    if batch is not None:
        stmt = stmt.where(CandidateBatch.name == batch)
    out = []
    for cand, b in session.execute(stmt.order_by(CandidateBatch.id, Candidate.index)).all():
        honeypot = b.masks == "honeypot"
        if cand.flagged is None and not honeypot:
            continue  # not through the privacy filter yet: never reviewable
        mine = current.get(cand.id, {})
        accepts = sorted(names[r] for r, d in mine.items() if d.decision == "accept")
        rejects = sorted(names[r] for r, d in mine.items() if d.decision == "reject")
        flagged = bool(cand.flagged) and not honeypot
        out.append(
            CandidateState(
                id=cand.id,
                batch=b.name,
                name=cand.name,
                flagged=flagged,
                honeypot=honeypot,
                state=derive_state(flagged, len(accepts), len(rejects), policy),
                accepts=accepts,
                rejects=rejects,
                decisions=len(mine),
                decided_by=sorted(mine),
                votes={r: d.decision for r, d in sorted(mine.items())},
            )
        )
    return out


def states_json(states: list[CandidateState]) -> list[dict[str, Any]]:
    """JSON-ready candidate states."""
    return [asdict(s) for s in states]
