"""The release ledger: every bundle `pipeline export` built, what it held, and what the review
has withdrawn from it since.

A bundle that left the hospital cannot be recalled, so the catalog must say what left and when:
one ``releases`` row per bundle (dataset, id, folder, time, the manifest's and the zip's digests,
the policy, who) and one ``release_cases`` row per case (candidate, case, the digests of its
image and label files). nnU-Net keys datasets by their three-digit id, so two releases with
different cases never share one; an export of exactly the cases of an earlier release under the
same name is a reproduction and keeps its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.catalog import Release, ReleaseCase
from pipeline.decisions import candidate_states
from pipeline.errors import PipelineError

#: Where automatic ids start (nnU-Net's custom datasets conventionally use 500 and up).
FIRST_ID = 500


@dataclass(frozen=True)
class LedgerCase:
    """One case as the ledger records it."""

    candidate_id: int
    case: str
    image_sha256: str
    label_sha256: str


def _reproduces(release: Release, name: str, cases: list[LedgerCase]) -> bool:
    """Whether ``release`` is exactly these cases under this name."""
    held = [(c.candidate_id, c.image_sha256, c.label_sha256) for c in release.cases]
    same = held == [(c.candidate_id, c.image_sha256, c.label_sha256) for c in cases]
    return same and release.dataset.split("_", 1)[1] == name


def choose_dataset_id(
    session: Session, requested: int | None, name: str, cases: list[LedgerCase]
) -> int:
    """The dataset id of a new bundle. ``requested`` None: the id of an earlier release of
    exactly these cases under this name (a reproduction), else the lowest id from
    :data:`FIRST_ID` no release has used. A requested id is refused when a release under it
    holds other cases or another name: two different datasets would share one nnU-Net id."""
    releases = list(session.scalars(select(Release).order_by(Release.id)))
    if requested is None:
        for r in releases:
            if _reproduces(r, name, cases):
                return r.dataset_id
        used = {r.dataset_id for r in releases}
        free = next((i for i in range(FIRST_ID, 1000) if i not in used), None)
        if free is None:
            free = next((i for i in range(1, FIRST_ID) if i not in used), None)
        if free is None:
            raise PipelineError("every dataset id 1–999 is in the release ledger")
        return free
    for r in releases:
        if r.dataset_id == requested and not _reproduces(r, name, cases):
            nxt = choose_dataset_id(session, None, name, cases)
            raise PipelineError(
                f"{r.dataset} was released at {r.export_time} with {len(r.cases)} case(s) "
                "that differ from these; a different release needs its own id: "
                f"--dataset-id {nxt} (or leave --dataset-id out)"
            )
    return requested


def record_release(
    session: Session,
    *,
    dataset: str,
    dataset_id: int,
    folder: str,
    export_time: str,
    manifest_sha256: str,
    zip_sha256: str,
    policy: str,
    by: str,
    cases: list[LedgerCase],
) -> Release:
    """Add one bundle and its cases to the ledger (the caller's transaction)."""
    row = Release(
        dataset=dataset,
        dataset_id=dataset_id,
        folder=folder,
        export_time=export_time,
        manifest_sha256=manifest_sha256,
        zip_sha256=zip_sha256,
        policy=policy,
        by=by,
    )
    session.add(row)
    session.flush()
    session.add_all(
        ReleaseCase(
            release_id=row.id,
            candidate_id=c.candidate_id,
            case=c.case,
            image_sha256=c.image_sha256,
            label_sha256=c.label_sha256,
        )
        for c in cases
    )
    session.flush()
    return row


def release_ledger(session: Session, *, policy: str) -> list[dict[str, Any]]:
    """Every release, oldest first, with its cases and those withdrawn since: a case whose
    candidate the review no longer calls accepted (an accept undone, a reject added, flagged
    by a re-filter). The bundle that left still holds it; the ledger is how an admin knows."""
    states = {s.id: s for s in candidate_states(session, policy=policy)}
    out = []
    for r in session.scalars(select(Release).order_by(Release.id)):
        case_list = [
            {
                "case": c.case,
                "candidate": c.candidate_id,
                "batch": states[c.candidate_id].batch if c.candidate_id in states else None,
                "name": states[c.candidate_id].name if c.candidate_id in states else None,
                "image_sha256": c.image_sha256,
                "label_sha256": c.label_sha256,
            }
            for c in r.cases
        ]
        withdrawn = [
            {**c, "state": states[c["candidate"]].state if c["candidate"] in states else "gone"}
            for c in case_list
            if c["candidate"] not in states or states[c["candidate"]].state != "accepted"
        ]
        out.append(
            {
                "release": r.id,
                "dataset": r.dataset,
                "dataset_id": r.dataset_id,
                "folder": r.folder,
                "export_time": r.export_time,
                "recorded_at": r.created_at.isoformat(),
                "by": r.by,
                "policy": r.policy,
                "cases": len(case_list),
                "manifest_sha256": r.manifest_sha256,
                "zip_sha256": r.zip_sha256,
                "case_list": case_list,
                "withdrawn": withdrawn,
            }
        )
    return out
