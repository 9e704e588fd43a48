"""The physician review app (Streamlit). Started by `pipeline review`; the workspace comes from
``PIPELINE_WORKSPACE``. Thin: every rule (login, policy, decisions, queue) is in
``pipeline.review``; this script draws and dispatches.
"""

from __future__ import annotations

import os
import time

import streamlit as st
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pipeline.catalog import Candidate, Reviewer, read_session, write_session
from pipeline.errors import PipelineError
from pipeline.preprocess import VIEW_WINDOWS, view_label
from pipeline.review import (
    MAX_FIELD,
    REJECT_REASONS,
    candidate_states,
    case_slices,
    login,
    open_session_reviewer,
    progress,
    queue,
    record_case_decision,
    review_code,
    review_key,
    reviewer_stats,
    undo_last,
    visible_provenance,
    visible_state,
)
from pipeline.validate import markdown_text
from release.ledger import release_ledger
from reviewer_app.views import (
    candidate_view,
    case_planes,
    catalog_unchanged,
    image_html,
    legend_html,
    load_index_cached,
    neighbours_cached,
    open_ws,
    policy_of,
    source_slice,
)

st.set_page_config(page_title="cardiac-synth review", layout="wide")
PRESETS_DEFAULT = "soft tissue"
FLAGGED_PAIRS = 12
ws = open_ws(os.environ.get("PIPELINE_WORKSPACE", "workspace"))
state = st.session_state


def show_login() -> None:
    """Nothing but the login form before login: no image, no count, no file name."""
    st.title("cardiac-synth · physician review")
    with st.form("login"):
        name = st.text_input("Name", key="login_name")
        password = st.text_input("Password", type="password", key="login_password")
        if st.form_submit_button("Log in"):
            try:
                state.user = login(ws.engine, name, password)
                state.last_seen = time.time()
                state.skipped = []
                st.rerun()
            except PipelineError as exc:
                st.error(markdown_text(exc.message))
            except OperationalError as exc:  # a long write (an import) holds the catalog
                if not is_busy(exc):
                    raise
                st.warning(BUSY)


def reviewer_row(session: Session) -> Reviewer:
    """The logged-in reviewer's row in ``session``."""
    return session.get(Reviewer, state.user["id"])


def acting_reviewer(session: Session) -> Reviewer | None:
    """The reviewer this page may write for *now* (alive, not idle too long, enabled); else
    the session ends. Callbacks run before the script body, so each write asks this itself."""
    if not catalog_unchanged(ws):
        raise PipelineError(CATALOG_GONE)
    user = state.get("user")
    row = open_session_reviewer(
        session, user["id"] if user else None, state.get("last_seen"), time.time()
    )
    if row is None and "user" in state:
        del state["user"]
        state.expired = True
    return row


BUSY = "The catalog is busy (another command is writing); try again shortly."


def is_busy(exc: OperationalError) -> bool:
    """Whether SQLite gave up waiting for another writer (past the 30 s busy timeout)."""
    return "locked" in str(exc) or "busy" in str(exc)


CATALOG_GONE = (
    "the workspace's catalog was deleted or replaced since this app started: nothing can be "
    "recorded; restart the app ('pipeline review')"
)
if not catalog_unchanged(ws):
    st.error(CATALOG_GONE)
    st.stop()
try:
    policy = policy_of(ws)
    with read_session(ws.engine) as session:
        # one session per script run: the session check, then (if it holds) the page's data
        me = acting_reviewer(session) if "user" in state else None
        if me is None:
            if state.pop("expired", False):
                st.info("Your session expired or your account was disabled; please log in again.")
            show_login()
            st.stop()
        state.last_seen = time.time()
        # the role as the catalog says *now*: an admin demoted while logged in loses the admin
        # views on the next interaction (it was read once, at login)
        state.user = {**state.user, "name": me.name, "role": me.role}
        is_admin = me.role == "admin"
        key = review_key(session)
        # one derivation of every candidate's state per script run, shared by all tabs
        everything = candidate_states(session, policy=policy)
        counts = progress(session, me, policy=policy, admin=is_admin, states=everything)
except OperationalError as exc:  # a long write elsewhere held the catalog past the timeout
    if not is_busy(exc):
        raise
    st.warning(BUSY)
    st.stop()


def label_of(candidate_id: int, batch: str, name: str) -> str:
    """What this page calls a candidate: its batch and name for admins, its review code for
    everyone else (names and batches would mark honeypots)."""
    code = review_code(key, candidate_id)
    return f"{batch} / {name} ({code})" if is_admin else f"candidate {code}"


with st.sidebar:
    st.markdown(f"**{markdown_text(state.user['name'])}** ({state.user['role']})")
    everyone = (
        f"Overall: **{counts['overall']} of {counts['total']}** decided"
        if is_admin  # a decided count would tell a reviewer how others voted (see progress)
        else f"All reviewers: **{counts['votes']}** votes"
    )
    st.markdown(
        f"You: **{counts['mine']} of {counts['total']}** reviewed  \n{everyone} (policy: {policy})"
    )
    if st.button("Log out"):
        for key in ("user", "skipped"):
            state.pop(key, None)
        st.rerun()

names = ["Review", "Flagged (read-only)", "All candidates"]
if is_admin:
    names.append("Admin")
tabs = st.tabs(names)


def review_tab() -> None:
    """The queue: one candidate, its pictures and nearest sources, and the vote buttons."""
    with read_session(ws.engine) as session:
        todo = queue(session, reviewer_row(session), policy=policy, states=everything)
    skipped = state.setdefault("skipped", [])
    todo.sort(key=lambda s: skipped.index(s.id) + 1 if s.id in skipped else 0)
    if not todo:
        st.success("Nothing left for you to review.")
        return
    current = todo[0]
    with read_session(ws.engine) as session:
        members = case_slices(session, current.id)  # a volume case is judged whole
    loaded = load_index_cached(ws)  # before anything is drawn: a missing index is one message
    label = label_of(current.id, current.batch, current.name)
    if len(members) > 1:
        label = f"{label.replace('candidate ', 'case ')} ({len(members)} slices)"
        st.subheader(markdown_text(label))
        z = st.slider(
            "Slice (feet → head)",
            0,
            len(members) - 1,
            value=len(members) // 2,
            key=f"case_z_{current.id}",
        )
        st.caption(
            "A decision covers every slice of this case; the nearest source slices are the "
            "current slice's."
        )
    else:
        z = 0
        st.subheader(markdown_text(label))
    shown_id = members[z]
    view = candidate_view(ws, shown_id)
    near = neighbours_cached(ws, shown_id, view.unit)
    left, right = st.columns([3, 2])
    with left:
        if view.units == "HU":
            preset = st.radio("Window", list(VIEW_WINDOWS), horizontal=True, key="preset")
        else:
            preset = None
            st.caption("Display units (the sources were PNG): no HU window.")
        show_mask = st.toggle("Mask overlay", value=True, key="overlay")
        compare = st.radio(
            "Beside the candidate",
            ["nothing", *[f"source {i + 1}" for i in range(len(near))]],
            horizontal=True,
            key="compare",
        )
        shown = view_label(view.units, preset)
        drawn = view.picture(preset, show_mask)
        if compare == "nothing":
            st.html(image_html(drawn, alt=f"candidate · {shown}", width=512))
            if len(members) > 1:
                coronal, sagittal = case_planes(
                    [candidate_view(ws, m) for m in members], z, preset, show_mask
                )
                c1, c2 = st.columns(2)
                with c1:
                    st.html(image_html(coronal, alt=f"coronal · {shown}"))
                    st.caption("coronal (head up; the current slice in yellow)")
                with c2:
                    st.html(image_html(sagittal, alt=f"sagittal · {shown}"))
                    st.caption("sagittal (head up; the current slice in yellow)")
        else:
            n = near[int(compare.split()[1]) - 1]
            c1, c2 = st.columns(2)
            with c1:
                st.html(image_html(drawn, alt=f"candidate · {shown}"))
                st.caption("candidate")
            with c2:
                st.html(
                    image_html(view.source_picture(n["image"], preset), alt=f"{compare} · {shown}")
                )
                st.caption(markdown_text(f"{compare} (a real scan)"))
        st.caption(markdown_text(f"All pictures on this page: {shown}, same scale."))
        if show_mask:
            st.markdown(legend_html(view.class_names), unsafe_allow_html=True)
    with right:
        cal = loaded.calibration
        f = view.filtered
        st.markdown("**Nearest source slices** (the filter's search and scorer)")
        if not is_admin:
            # A honeypot is a near-copy the filter would flag, and every other image in the
            # queue is under the threshold: any score shown here would mark the honeypots.
            st.caption(
                f"The filter calls an image too similar when {cal.describe()}. Its scores are "
                "for admins; judge by eye whether this image is too close to a source slice."
            )
        elif f["ssim"] is not None:
            st.caption(
                f"The filter stored: SSIM {f['ssim']:.3f} · texture {f['texture']:.3f} "
                f"(nearest slice {f['nearest_slice']}); too similar when {cal.describe()} "
                f"({cal.provenance()})."
            )
        else:
            st.caption(f"Not scored by the filter (a honeypot); too similar when {cal.describe()}.")
        cols = st.columns(len(near) or 1)
        for i, (col, n) in enumerate(zip(cols, near, strict=False), start=1):
            with col:
                st.html(
                    image_html(view.source_picture(n["image"], preset), alt=f"source {i} · {shown}")
                )
                mirrored = " (mirrored)" if n["mirrored"] else ""
                scores = f": SSIM {n['ssim']:.3f} · texture {n['texture']:.3f}" if is_admin else ""
                st.caption(f"{i}{scores}{mirrored}")
    with st.expander("Provenance"):
        code = review_code(key, current.id)
        st.json(visible_provenance(view.provenance, admin=is_admin, code=code))
    # the stored reason is "<reason>: <note>", bounded like an imported field
    st.text_input("Note (optional)", key="note", max_chars=MAX_FIELD - 100)
    a, r, u, s = st.columns(4)

    # Callbacks run before the next script run, so they may clear the note widget: a note
    # must never carry over to the next candidate.
    def decide(kind: str, candidate_id: int, label: str, reason: str | None = None) -> None:
        note = state.get("note", "").strip()
        if kind == "reject" and not reason:  # never a reason nobody chose: say how
            state.last_action = "a reject needs a reason: press 1–6 (or click one below)"
            return
        text = (reason or "") + (f": {note}" if note else "") if kind == "reject" else ""
        try:
            with write_session(ws.engine) as session:
                who = acting_reviewer(session)
                if who is None:
                    return
                # a stale page (another tab) must not replace a newer vote of the same person;
                # a volume case's vote covers every one of its slices
                record_case_decision(
                    session, who, candidate_id, kind, reason=text, if_undecided=True
                )
            state.last_action = f"{kind}ed {label}" + (f" ({reason})" if reason else "")
            state.note = ""
        except PipelineError as exc:
            state.last_action = f"error: {exc.message}"
        except OperationalError as exc:
            if not is_busy(exc):
                raise
            state.last_action = f"{BUSY} Nothing recorded for {label}."

    def skip(candidate_id: int) -> None:
        skipped.append(candidate_id)
        state.note = ""

    def undo() -> None:
        try:
            with write_session(ws.engine) as session:
                who = acting_reviewer(session)
                if who is None:
                    return
                undone = undo_last(session, who)
        except PipelineError as exc:
            state.last_action = f"error: {exc.message}"
            return
        except OperationalError as exc:
            if not is_busy(exc):
                raise
            state.last_action = f"{BUSY} Nothing undone."
            return
        state.last_action = "undid your last decision" if undone else "nothing to undo"

    a.button(
        "Accept (a)",
        type="primary",
        shortcut="a",
        key="accept",
        on_click=decide,
        args=("accept", current.id, label),
    )
    r.button(
        "Reject (x)",
        shortcut="x",
        key="reject",
        on_click=decide,
        args=("reject", current.id, label),
    )
    s.button("Skip (s)", shortcut="s", key="skip", on_click=skip, args=(current.id,))
    u.button("Undo my last (u)", shortcut="u", key="undo", on_click=undo)
    st.caption("Reject with a reason (type a note first if you want one):")
    # two reasons a row: six in one row were cut off at 1280 px ("1 too simila…"), and a
    # physician must read what they press
    for i, reason in enumerate(REJECT_REASONS, start=1):
        if i % 2 == 1:
            row = st.columns(2)
        row[(i - 1) % 2].button(
            f"{i} {reason}",
            shortcut=str(i),
            key=f"reason_{i}",
            on_click=decide,
            args=("reject", current.id, label, reason),
            width="stretch",
            help=f"Reject: {reason} (key {i})",
        )
    if len(todo) > 1:
        # The page is already drawn: warm the cache for the next candidate while the physician
        # looks at this one, so Accept → next image does not wait for the neighbour search.
        upcoming = candidate_view(ws, todo[1].id)
        neighbours_cached(ws, todo[1].id, upcoming.unit)


with tabs[0]:
    try:
        review_tab()
    except PipelineError as exc:  # e.g. no index/: say what to do, never a traceback
        st.error(markdown_text(exc.message))
    except OperationalError as exc:
        if not is_busy(exc):
            raise
        st.warning(BUSY)
    if state.get("last_action"):
        st.caption(markdown_text(state.last_action))

with tabs[1]:
    with read_session(ws.engine) as session:
        flagged = [s for s in everything if s.flagged]
        rows = {
            c.id: c for c in session.scalars(select(Candidate).where(Candidate.flagged.is_(True)))
        }
        info = {
            cid: (c.privacy_score, c.texture_score, c.privacy_margin, c.nearest_slice_id)
            for cid, c in rows.items()
        }
    st.caption("Too similar to a source scan: these can never be accepted or exported.")
    if not flagged:
        st.write("No flagged candidates.")
    elif is_admin:
        # admins judging whether the filter is too strict compare each pair by eye
        st.caption(
            "Each flagged candidate beside the source slice the filter found nearest, both in "
            f"the {PRESETS_DEFAULT} window at the same scale (first {FLAGGED_PAIRS} shown)."
        )
    for n, f in enumerate(flagged[:50]):
        score, texture, margin, nearest = info.get(f.id, (None, None, None, None))
        line = (
            f"{markdown_text(label_of(f.id, f.batch, f.name))}: SSIM {score:.3f}, "
            f"texture {texture:.3f}, margin {margin:.3f}"
        )
        if not is_admin or n >= FLAGGED_PAIRS:
            st.markdown(f"- {line}")
            continue
        st.markdown(f"**{line}**")
        flagged_view = candidate_view(ws, f.id)
        source = source_slice(ws, nearest) if nearest is not None else None
        shown = view_label(flagged_view.units, PRESETS_DEFAULT)
        c1, c2, _ = st.columns([1, 1, 2])
        with c1:
            picture = flagged_view.picture(PRESETS_DEFAULT, False)
            st.html(image_html(picture, alt=f"flagged candidate · {shown}"))
            st.caption("candidate")
        with c2:
            if source is None:
                st.caption("nearest source slice not in the index (re-run pipeline index)")
            else:
                picture = flagged_view.source_picture(source, PRESETS_DEFAULT)
                st.html(image_html(picture, alt=f"nearest source · {shown}"))
                st.caption("nearest source slice (a real scan)")

with tabs[2]:
    # blind double reading: plain reviewers see others' votes only once a state is final
    table = [
        visible_state(s, viewer_id=state.user["id"], admin=is_admin, key=key) for s in everything
    ]
    if not is_admin:
        # batch order would put a honeypot batch's rows together at the end: order by code
        table.sort(key=lambda row: row["candidate"])
    kinds = sorted({row["state"] for row in table})
    chosen = st.multiselect("Status", kinds, default=kinds, key="status_filter")
    st.dataframe([row for row in table if row["state"] in chosen], width="stretch")

if is_admin:
    with tabs[3]:
        with read_session(ws.engine) as session:
            stats = reviewer_stats(session)
            ledger = release_ledger(session, policy=policy)
        disagreements = [s for s in everything if s.state == "disagreement"]
        st.markdown("**Reviewers** (agreement with other reviewers; honeypot catch rate)")
        st.dataframe(stats, width="stretch")
        st.markdown(f"**Disagreements** ({len(disagreements)})")
        for d in disagreements:
            st.markdown(
                f"- {markdown_text(d.batch)} / {markdown_text(d.name)}: accepted by "
                f"{markdown_text(', '.join(d.accepts))}; rejected by "
                f"{markdown_text(', '.join(d.rejects))}"
            )
        withdrawn = [(r, c) for r in ledger for c in r["withdrawn"]]
        st.markdown(
            f"**Releases** ({len(ledger)}; {len(withdrawn)} case(s) withdrawn after release)"
        )
        st.dataframe(
            [
                {
                    "dataset": r["dataset"],
                    "cases": r["cases"],
                    "exported": r["export_time"],
                    "by": r["by"],
                    "withdrawn since": len(r["withdrawn"]),
                    "folder": r["folder"],
                }
                for r in ledger
            ],
            width="stretch",
        )
        if withdrawn:
            st.caption(
                "Released, and no longer accepted: the bundle that left still holds these. "
                "Tell whoever received it."
            )
        for r, c in withdrawn:
            what = f"{r['dataset']} {c['case']} = {c['batch']} / {c['name']} (now {c['state']})"
            st.markdown(f"- withdrawn after release: {markdown_text(what)}")
