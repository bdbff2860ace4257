"""Fair sharing: a delivery is a turn for the fairest queued job, and turns and jobs stay balanced."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import update

from service import jobs as machine
from service.db import Job
from service.scheduling import claim_turn, fair_queue
from tests.service.test_state_machine import new_job, status


def test_a_later_tenant_goes_before_an_earlier_tenants_backlog(sessions) -> None:
    flood = [new_job(sessions, "alice") for _ in range(4)]
    with sessions() as session:
        assert machine.claim(session, flood[0], "w", 30)  # alice's first job runs
    late = new_job(sessions, "bob")
    with sessions() as session:
        # bob has nothing running: his job first, then alice's in her order
        assert fair_queue(session) == [late, *flood[1:]]
        assert machine.finish(session, flood[0], "w", machine.SUCCEEDED)
        # alice ran most recently and bob never: still bob first
        assert fair_queue(session) == [late, *flood[1:]]


def test_tenants_alternate_and_each_keeps_its_own_order(sessions) -> None:
    a = [new_job(sessions, "alice") for _ in range(3)]
    b = [new_job(sessions, "bob") for _ in range(2)]
    c = [new_job(sessions, "carol")]
    with sessions() as session:
        order = fair_queue(session)
    assert sorted(order) == sorted(a + b + c)
    assert order[:3] == [a[0], b[0], c[0]] and order[3:] == [a[1], b[1], a[2]]


def test_the_least_recently_served_tenant_goes_first(sessions) -> None:
    a = [new_job(sessions, "alice") for _ in range(2)]
    b = [new_job(sessions, "bob") for _ in range(2)]
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with sessions() as session:
        for job_id, started in ((a[0], now), (b[0], now - dt.timedelta(hours=1))):
            session.execute(update(Job).where(Job.id == job_id).values(status="succeeded", started_at=started))
        session.commit()
        assert fair_queue(session) == [b[1], a[1]]


def test_turns_and_jobs_stay_balanced(sessions) -> None:
    """One message per job, delivered in submission order to one worker: every job runs exactly
    once, and the late tenant's job runs second, not last."""
    flood = [new_job(sessions, "alice") for _ in range(5)]
    late = new_job(sessions, "bob")
    ran = []
    for delivered in [*flood, late]:  # the broker's FIFO order
        with sessions() as session:
            job_id = claim_turn(session, delivered, "w", 30)
            assert job_id is not None
            ran.append(job_id)
            assert machine.finish(session, job_id, "w", machine.SUCCEEDED)
    assert sorted(ran) == sorted([*flood, late])
    assert ran[:2] == [flood[0], late] and ran[2:] == flood[1:]
    with sessions() as session:
        assert claim_turn(session, late, "w", 30) is None  # a duplicate with nothing queued: dropped


def test_an_abandoned_running_job_is_resumed_by_its_own_delivery(sessions) -> None:
    first = new_job(sessions, "alice")
    other = new_job(sessions, "bob")
    with sessions() as session:
        assert machine.claim(session, first, "dead-worker", lease_seconds=0.0)  # lease already expired
        assert claim_turn(session, first, "w", 30) == first  # its checkpoints are worth resuming
    assert status(sessions, first).worker == "w" and status(sessions, other).status == "queued"


@pytest.mark.parametrize("cancelled", [True, False])
def test_a_spare_delivery_runs_the_next_queued_job(sessions, cancelled: bool) -> None:
    """The message of a cancelled job, or a duplicate of a running one, is a turn for someone else."""
    first, second = new_job(sessions, "alice"), new_job(sessions, "alice")
    with sessions() as session:
        if cancelled:
            assert machine.request_cancel(session, first) == machine.CANCELLED
        else:
            assert machine.claim(session, first, "w1", 30)
        assert claim_turn(session, first, "w2", 30) == second


def test_turns_and_jobs_stay_balanced_on_postgres(pg_sessions) -> None:
    test_turns_and_jobs_stay_balanced(pg_sessions)
