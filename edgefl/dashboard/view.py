"""The dashboard's view model: a fleet's state and the aggregator's record turned into the JSON
the page draws. Pure (the clock is passed in), so it is tested without a server or a broker.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from edgefl.dashboard.fleet_state import UNSIGNED_HINT, FleetState
from edgefl.delivery.fleet_view import fleet_view, privacy_line, running_text
from edgefl.delivery.release import TERMINAL_STATES
from edgefl.roles.summary import RoundSummary

# The page's JSON layout; bumped when a field changes meaning (the page checks it).
VIEW_SCHEMA = 1
STATES = ("online", "stale", "offline", "unknown")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def device_rows(state: FleetState, now: float) -> list[dict[str, Any]]:
    """Return one row per device (online first, then by ID) with presence, profile, bundle,
    what runs the backbone, the last round it was selected in and its answer there ("accepted"
    or a rejection code), when it was last heard and its deploy.
    """
    # A board re-announces its last round only with its heartbeat; the retained results say at
    # once which round each selected device answered, and how.
    answered: dict[str, tuple[int, str]] = {}
    for number in sorted(state.results):
        for device, answer in state.results[number].answers.items():
            answered[device] = (number, answer)
    rows = []
    devices = state.devices if state.checks_seals else None
    for row in fleet_view(state.statuses, state.reports, state.seen, now):
        last_round, last_answer = answered.get(row.device_id, (0, ""))
        refused = state.refused.get(row.device_id)
        rows.append(
            {
                "id": row.device_id,
                "state": row.state,
                "profile": row.profile,
                "group": row.group,
                "model_version": row.model_version,
                "bundle_digest": row.bundle_digest,
                "artifact": row.artifact,
                "runtime": row.runtime,
                "provider": row.provider,
                "running": running_text(row),
                "samples": row.samples,
                "last_round": max(row.last_round, last_round),
                "last_answer": last_answer if last_round >= row.last_round else "",
                "last_seen": state.seen.get(row.device_id, row.last_seen) or None,
                "deploy": row.last_deploy,
                # How its key is known (enrolled, pinned, revoked, unknown); "" unchecked.
                "key": devices.state(row.device_id) if devices is not None else "",
                "refused": refused.count if refused is not None else 0,
            }
        )
    return rows


def refused_rows(state: FleetState) -> list[dict[str, Any]]:
    """Return, per device, the messages refused in its name (most first): how many, how many
    forged, the last reason and the sentence the page shows, e.g. "3 forged messages refused in
    pi-1's name: bad-signature: signed with key ..., but device pi-1 is enrolled with key ..."."""
    rows = []
    for device, refused in sorted(state.refused.items(), key=lambda i: (-i[1].count, i[0])):
        kind = "forged message" if refused.forged == refused.count else "message"
        rows.append(
            {
                "device": device,
                "count": refused.count,
                "forged": refused.forged,
                "reason": refused.reason,
                "line": f"{_messages(refused.count, kind)} refused in {device}'s name: "
                f"{refused.reason}",
            }
        )
    return rows


def _messages(count: int, kind: str = "message") -> str:
    return f"{count} {kind}" + ("" if count == 1 else "s")


def seals_view(state: FleetState, record: str | None) -> dict[str, Any]:
    """Return whether the devices' seals are checked, the messages refused, and the sentence
    the page shows about it (plainly so when nothing is checked)."""
    if state.checks_seals:
        line = (
            "seals checked: a status or deploy report is shown only when sealed by the key its "
            f"device is enrolled or pinned with in {record}; {_messages(state.refused_total)} "
            "refused"
        )
        if state.refused_unsigned:
            line += f" ({state.refused_unsigned} not signed at all: {UNSIGNED_HINT})"
    elif state.devices is not None:  # --insecure
        line = (
            "seals NOT checked (--insecure): anyone on the broker can publish a status or deploy "
            "report in a board's name, and it shows here"
        )
    else:
        line = (
            "seals NOT checked: anyone on the broker can publish a status or deploy report in a "
            "board's name, and it shows here; `edgefl dashboard --state FILE` (the aggregator's "
            "state) checks them against the enrolled keys"
        )
    return {
        "checked": state.checks_seals,
        "line": line,
        "refused": state.refused_total,
        "unsigned": state.refused_unsigned,
    }


def round_rows(state: FleetState, summaries: Sequence[RoundSummary]) -> list[dict[str, Any]]:
    """Return one row per round, oldest first: finished rounds from the record when there is one
    (its counts include rejections that arrived after a round closed) or from the retained
    results, then the rounds still running (their task is retained).

    Each row holds status, participants (selected, accepted, online), rejections by code, late
    updates, accuracy, bytes up (accepted updates) and down (the task, to each selected
    device), duration in seconds and, where DP accounting ran, ε and δ.
    """
    by_round: dict[int, dict[str, Any]] = {}
    for number, result in state.results.items():
        metrics = result.metrics
        by_round[number] = {
            "round": number,
            "status": result.status,
            "head_version": result.head_version,
            "selected": result.selected,
            "accepted": result.accepted,
            "online": result.online,
            "rejected": dict(result.rejected),
            "late": result.late,
            "metrics": metrics,
            "seconds": state.round_seconds.get(number),
        }
    for summary in summaries:
        by_round[summary.round] = {
            "round": summary.round,
            "status": summary.status,
            "head_version": summary.head_version,
            "selected": summary.selected,
            "accepted": summary.accepted,
            "online": summary.online,
            "rejected": dict(summary.rejected),
            "late": summary.late,
            "metrics": summary.metrics,
            "seconds": summary.seconds,
        }
    rows = []
    for number in sorted(by_round):
        row = by_round[number]
        values: dict[str, float] = row.pop("metrics")
        task_bytes = state.task_bytes.get(number)
        per_update = values.get("bytes_per_update")
        row.update(
            accuracy=_finite(values.get("accuracy")),
            bytes_up=round(per_update * row["accepted"]) if per_update is not None else None,
            bytes_down=task_bytes * row["selected"] if task_bytes is not None else None,
            epsilon=_finite(values.get("epsilon")),
            delta=_finite(values.get("delta")),
            rejected_total=sum(row["rejected"].values()),
        )
        rows.append(row)
    finished = set(by_round)
    for number in sorted(state.tasks):
        if number in finished:
            continue
        task = state.tasks[number]
        rows.append(
            {
                "round": number, "status": "running", "head_version": None,
                "selected": task.selected, "accepted": None, "online": None, "rejected": {},
                "late": 0, "seconds": None, "accuracy": None, "bytes_up": None,
                "bytes_down": task.task_bytes * task.selected, "epsilon": None, "delta": None,
                "rejected_total": 0, "deadline_s": task.deadline_s, "started": task.seen_at,
            }
        )  # fmt: skip
    return rows


def deploy_rows(state: FleetState) -> list[dict[str, Any]]:
    """Return each board's latest deploy report, boards still downloading first, then by ID."""
    rows = [
        {
            "device": device,
            "version": report.version,
            "state": report.state,
            "terminal": report.state in TERMINAL_STATES,
            "received_bytes": report.received_bytes,
            "total_bytes": report.total_bytes,
            "reason": report.reason,
            "time": report.time or None,
        }
        for device, report in state.reports.items()
    ]
    rows.sort(key=lambda r: (r["terminal"], r["device"]))
    return rows


def privacy_view(state: FleetState, rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the privacy spent: the latest round's ε at δ (None when no round was noised and
    accounted) and the sentence `edgefl fleet` prints about it."""
    latest = next((r for r in reversed(rounds) if r["epsilon"] is not None), None)
    return {
        "epsilon": latest["epsilon"] if latest else None,
        "delta": latest["delta"] if latest else None,
        "round": latest["round"] if latest else None,
        "line": privacy_line(state.results.values()),
    }


def build_view(
    state: FleetState,
    summaries: Sequence[RoundSummary] = (),
    now: float = 0.0,
    connected: bool = True,
    record: str | None = None,
    record_error: str = "",
) -> dict[str, Any]:
    """Return the whole page's data as a JSON-ready dict.

    Args:
        state: what the fleet's messages said.
        summaries: the finished rounds from the aggregator's record (`summaries_from_record`);
            empty without a record.
        now: the current Unix time (presence turns stale by time passing alone).
        connected: whether the dashboard's MQTT connection is up (the page says when not).
        record: the record's path, shown on the page (None: no record given).
        record_error: why the record could not be read just now ("" when it could).
    """
    devices = device_rows(state, now)
    rounds = round_rows(state, summaries)
    counts = Counter(row["state"] for row in devices)
    rejected: Counter[str] = Counter()
    for row in rounds:
        rejected.update(row["rejected"])
    return {
        "schema": VIEW_SCHEMA,
        "fleet": state.fleet,
        "now": now,
        "connected": connected,
        "record": record,
        "record_error": record_error,
        "version": state.version,
        "ignored_messages": state.ignored,
        "counts": {name: counts.get(name, 0) for name in STATES},
        "devices": devices,
        "rounds": rounds,
        "rejected_by_code": dict(sorted(rejected.items())),
        "deploys": deploy_rows(state),
        "privacy": privacy_view(state, rounds),
        "seals": seals_view(state, record),
        "refused": refused_rows(state),
    }
