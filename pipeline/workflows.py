"""Flows that join stages: judging a batch (filter, then evaluate) and the demo's shortcuts.

Stages never import each other; what strings them together lives here, above them, so the CLI
only parses options, calls one of these (or a stage) and prints.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.candidates import batch_row
from pipeline.catalog import Reviewer, Run, read_session, write_session
from pipeline.decisions import candidate_states
from pipeline.errors import PipelineError
from pipeline.filtering import filter_batch
from pipeline.progress import Progress
from pipeline.quality import GateConfig, evaluate
from pipeline.review import add_reviewer, demo_account, record_decision
from pipeline.workspace import Workspace
from release.bundle import ExportConfig, build_bundle
from release.verify import verify_bundle

#: The demo's bundle, under the workspace's releases/.
DEMO_BUNDLE = "CardiacSynthDemo"


def judge_batch(
    ws: Workspace,
    batch: str,
    gates: GateConfig,
    *,
    filter_progress: Progress = iter,
    encoder_progress: Progress = iter,
    utility_progress: Progress = iter,
) -> dict[str, Any]:
    """The privacy filter on a batch (verdicts stored), then the evaluation of the run that
    made it with the gates (stored with the batch). Returns the evaluation report."""
    filter_batch(ws, batch, progress=filter_progress)
    with read_session(ws.engine) as session:
        run = session.get(Run, batch_row(session, batch).run_id).name
    return evaluate(
        ws,
        run,
        gates,
        batch=batch,
        progress=encoder_progress,
        utility_progress=utility_progress,
    )


def open_demo_account(ws: Workspace, name: str) -> str:
    """A one-time admin account ``name`` for a newcomer's first review; returns its fresh
    random password (a new one on every call)."""
    password = secrets.token_urlsafe(12)
    with write_session(ws.engine) as session:
        demo_account(session, name, password)
    return password


@dataclass
class DemoRelease:
    """What the demo's automatic review led to."""

    accepted: int
    bundle: Path | None = None
    existed: bool = False
    refused: str | None = None  # why the export was refused (e.g. a short run failed its gates)
    problems: list[str] = field(default_factory=list)  # what verify found


def demo_auto_review(ws: Workspace, batch: str, *, progress: Progress = iter) -> DemoRelease:
    """DEMO ONLY: the built-in ``demo`` account (a random password nobody knows: it cannot log
    in) accepts every unflagged candidate of ``batch``; the bundle is exported into
    ``releases/`` (marked as a demo review in its manifest) and verified."""
    with write_session(ws.engine) as session:
        demo = session.scalar(select(Reviewer).where(Reviewer.name == "demo"))
        if demo is None:
            demo = add_reviewer(session, "demo", "demo", secrets.token_urlsafe(24))
        accepted = 0
        for s in candidate_states(session, policy="one", batch=batch):
            if s.state == "unreviewed" and not s.flagged:
                record_decision(session, demo, s.id, "accept")
                accepted += 1
    out = ws.releases_dir
    bundle = out / f"Dataset500_{DEMO_BUNDLE}"
    if bundle.exists():
        return DemoRelease(accepted, bundle, existed=True, problems=verify_bundle(bundle))
    cfg = ExportConfig(
        out=out,
        batches=(batch,),
        name=DEMO_BUNDLE,
        policy="one",
    )
    try:
        built = build_bundle(ws, cfg, progress=progress)
    except PipelineError as exc:
        return DemoRelease(accepted, refused=str(exc))
    return DemoRelease(accepted, built.folder, problems=verify_bundle(built.folder))
