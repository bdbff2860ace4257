"""The job state machine: conditional updates decide every race, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from service import jobs as machine
from service.db import Job
from tests.timing import patience


def new_job(sessions, tenant: str = "t") -> str:
    job_id = uuid.uuid4().hex
    with sessions() as session:
        session.add(
            Job(
                id=job_id,
                tenant=tenant,
                model_id="m",
                method="rtn",
                bits=2,
                options={},
                status="queued",
                stage="queued",
                request_hash="h",
            )
        )
        session.commit()
    return job_id


def status(sessions, job_id: str) -> Job:
    with sessions() as session:
        return session.get(Job, job_id)


def race(sessions, job_ids: list[str], workers: int) -> dict[str, list[str]]:
    """Every worker tries to claim every job at the same moment; returns job -> winners."""
    winners: dict[str, list[str]] = {j: [] for j in job_ids}
    barrier = threading.Barrier(workers)
    lock = threading.Lock()

    def worker(name: str) -> None:
        barrier.wait()
        for job_id in job_ids:
            with sessions() as session:
                if machine.claim(session, job_id, name, 30):
                    with lock:
                        winners[job_id].append(name)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners


def test_concurrent_claims_have_exactly_one_winner(sessions) -> None:
    job_ids = [new_job(sessions) for _ in range(20)]
    winners = race(sessions, job_ids, workers=4)
    assert all(len(w) == 1 for w in winners.values()), winners
    for job_id, (winner,) in winners.items():
        job = status(sessions, job_id)
        assert job.status == "running" and job.worker == winner and job.attempts == 1


def test_only_the_holder_finishes_and_only_an_expired_lease_is_taken_over(sessions) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert machine.claim(s, job_id, "a", lease_seconds=0.3)
        assert not machine.claim(s, job_id, "b", 30)  # lease live
        assert not machine.finish(s, job_id, "b", machine.SUCCEEDED)  # not b's job
        assert not machine.requeue_stale(s, job_id)
    time.sleep(0.5)
    with sessions() as s:
        assert machine.claim(s, job_id, "b", 30)  # a's lease expired: b takes over
        assert not machine.renew_lease(s, job_id, "a", 30)  # a learns it lost the job
        assert not machine.finish(s, job_id, "a", machine.SUCCEEDED)
        assert machine.finish(s, job_id, "b", machine.SUCCEEDED)
        assert not machine.claim(s, job_id, "c", 30)  # terminal states are final
    job = status(sessions, job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.percent == 100


def test_hand_off_passes_a_running_job_to_the_next_step(sessions) -> None:
    job_id = new_job(sessions)
    with sessions() as s:
        assert machine.claim(s, job_id, "quantizer", 30)
        started = s.get(Job, job_id).started_at
        assert not machine.hand_off(s, job_id, "stranger", "evaluation queued", 30)
        assert machine.hand_off(s, job_id, "quantizer", "evaluation queued", 30)
        assert not machine.renew_lease(s, job_id, "quantizer", 30)  # it is no longer the quantizer's
        assert machine.claim(s, job_id, "evaluator", 30)
        assert not machine.claim(s, job_id, "another", 30)
    job = status(sessions, job_id)
    assert (job.status, job.worker, job.attempts, job.started_at) == ("running", "evaluator", 1, started)


def test_cancel_queued_is_immediate_running_is_requested(sessions) -> None:
    queued, running = new_job(sessions), new_job(sessions)
    with sessions() as s:
        assert machine.request_cancel(s, queued) == "cancelled"
        assert not machine.claim(s, queued, "w", 30)  # a cancelled job's late message is dropped
        assert machine.claim(s, running, "w", 30)
        assert machine.request_cancel(s, running) == "running"
        # the worker sees the request at its next progress report
        assert machine.report_progress(s, running, "w", "quantize", 1, 10, 10.0, 5.0, 30) is True


def test_reaper_requeues_expired_leases_and_resends_lost_messages(sessions) -> None:
    from worker.reaper import reap_once

    stale, live, waiting = new_job(sessions), new_job(sessions), new_job(sessions)
    with sessions() as s:
        machine.claim(s, stale, "dead", lease_seconds=0.1)
        machine.claim(s, live, "alive", lease_seconds=60)
    time.sleep(0.3)
    sent: list[tuple[str, str]] = []
    send = lambda job_id, step: sent.append((job_id, step))  # noqa: E731
    assert set(reap_once(sessions, send, requeue_after_seconds=3600)) == {stale}
    assert status(sessions, stale).status == "queued" and status(sessions, live).status == "running"
    assert reap_once(sessions, send, requeue_after_seconds=3600) == []  # nothing twice
    time.sleep(0.2)
    assert set(reap_once(sessions, send, requeue_after_seconds=0.1)) == {stale, waiting}
    assert sorted(sent) == sorted([(stale, "quantize"), (stale, "quantize"), (waiting, "quantize")])


def test_a_job_waiting_for_its_evaluation_is_not_a_dead_worker(sessions) -> None:
    """Quantized and handed off while the only worker quantizes another job: the hand-off's lease
    runs out, but the job stays handed off (its artifact kept); only its evaluation message is
    re-sent, once per requeue_after_seconds, and the evaluator still claims it as the same attempt."""
    from worker.reaper import reap_once

    job_id = new_job(sessions)
    with sessions() as s:
        assert machine.claim(s, job_id, "quantizer", 30)
        assert machine.hand_off(s, job_id, "quantizer", "evaluation queued", 0.1)
    time.sleep(0.3)
    sent: list[tuple[str, str]] = []
    send = lambda job_id, step: sent.append((job_id, step))  # noqa: E731
    assert reap_once(sessions, send, requeue_after_seconds=3600) == []  # lease over, still no dead worker
    job = status(sessions, job_id)
    assert (job.status, job.worker, job.stage) == ("running", None, "evaluation queued")
    assert reap_once(sessions, send, requeue_after_seconds=0.1, lease_seconds=60) == [job_id]
    assert reap_once(sessions, send, requeue_after_seconds=0.1, lease_seconds=60) == []  # not again at once
    assert sent == [(job_id, "evaluate")]
    with sessions() as s:
        assert machine.claim(s, job_id, "evaluator", 30)
    job = status(sessions, job_id)
    assert (job.status, job.worker, job.attempts) == ("running", "evaluator", 1)


@pytest.mark.integration
def test_concurrent_claims_on_postgres(pg_sessions) -> None:
    job_ids = [new_job(pg_sessions) for _ in range(30)]
    winners = race(pg_sessions, job_ids, workers=6)
    assert all(len(w) == 1 for w in winners.values()), winners


def test_reporter_raises_cancel_between_layers_and_lease_loss(sessions) -> None:
    from rsavq_core.errors import JobCancelled
    from worker.reporter import Heartbeat, LeaseLost, Reporter

    job_id = new_job(sessions)
    with sessions() as s:
        machine.claim(s, job_id, "w", 30)
    heartbeat = Heartbeat(sessions, job_id, "w", 30)
    reporter = Reporter(sessions, job_id, "w", 30, heartbeat, min_interval=0)
    reporter("quantize", 1, 10)
    assert status(sessions, job_id).done == 1 and status(sessions, job_id).percent == 10
    with sessions() as s:
        machine.request_cancel(s, job_id)
    with pytest.raises(JobCancelled):
        reporter("quantize", 2, 10)
    heartbeat.lost.set()
    with pytest.raises(LeaseLost):
        reporter("quantize", 3, 10)


def test_a_cancel_stops_the_work_inside_a_layer(sessions) -> None:
    """The heartbeat notes the cancel request; the inner loops' stop check raises at the first round
    after that, so a long k-means (one layer, no progress call) stops there, not at its end. The
    test waits on the heartbeat's event (with patience), not on a number of rounds, which would be
    a wall-clock limit in disguise: on a busy machine the heartbeat may see the request sooner or
    later than a fixed number of rounds."""
    import torch

    from rsavq_core.algorithms.kmeans import weighted_kmeans
    from rsavq_core.errors import JobCancelled
    from rsavq_core.progress import stop_check
    from worker.reporter import Heartbeat, Reporter

    job_id = new_job(sessions)
    with sessions() as s:
        machine.claim(s, job_id, "w", 30)
    rounds = []

    with Heartbeat(sessions, job_id, "w", lease_seconds=0.3) as heartbeat:  # renews every 0.1 s
        reporter = Reporter(sessions, job_id, "w", 0.3, heartbeat)

        def check() -> None:
            rounds.append(heartbeat.cancelled.is_set())
            if len(rounds) == 3:
                with sessions() as s:
                    machine.request_cancel(s, job_id)
                assert heartbeat.cancelled.wait(patience(5.0)), "the heartbeat never noted the cancel"
            reporter.check()

        points = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
        with stop_check(check), pytest.raises(JobCancelled):
            weighted_kmeans(points, None, 4, 10**6, torch.Generator().manual_seed(0))
    # No round saw a cancel before the third made the request, and the third, seeing it, was the last.
    assert rounds == [False, False, False], rounds
