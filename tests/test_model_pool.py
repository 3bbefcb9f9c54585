"""ModelPool (fast, no sockets): which worker gets a job, requeueing, and which jobs expire."""

from __future__ import annotations

from frontend.model_pool import Job, ModelPool, WorkerRecord


def worker(name: str, slots: int) -> WorkerRecord:
    return WorkerRecord(identity=(0, name.encode()), model="m", kind="chat", slots=slots, info={})


def job(n: int, enqueued: float = 0.0) -> Job:
    return Job(job_id=f"{n:032x}", client=b"c", model="m", body={}, enqueued=enqueued)


def test_dispatch_goes_to_the_worker_with_most_free_slots_oldest_job_first():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    small, big = worker("small", 1), worker("big", 3)
    pool.add(small)
    pool.add(big)
    for n in range(5):
        pool.enqueue(job(n))
    sent = pool.dispatch(now=0.0)
    assert [j.job_id for _, j in sent] == [f"{n:032x}" for n in range(4)]  # 4 slots in all
    assert [w for w, _ in sent][:2] == [big, big]  # 3 free beats 1 free, then 2 beats 1
    assert small.free() == 0 and big.free() == 0
    assert len(pool.queue) == 1 and all(j.attempts == 1 for _, j in sent)


def test_full_queue_and_withdraw():
    pool = ModelPool("m", queue_size=2, queue_timeout=30)
    first, second = job(1), job(2)
    pool.enqueue(first)
    assert not pool.full()
    pool.enqueue(second)
    assert pool.full()
    pool.withdraw(first)
    assert list(pool.queue) == [second] and not pool.full()


def test_a_requeued_job_goes_first_and_does_not_hide_older_expired_jobs():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    old_a, old_b, fresh = job(1, enqueued=0.0), job(2, enqueued=1.0), job(3, enqueued=50.0)
    pool.enqueue(old_a)
    pool.enqueue(old_b)
    fresh.worker = (0, b"dead")
    pool.requeue(fresh)
    assert pool.queue[0] is fresh and fresh.worker is None
    assert pool.expired_jobs(now=40.0) == [old_a, old_b]
    assert list(pool.queue) == [fresh]
    assert pool.expired_jobs(now=60.0) == []


def test_expired_workers_and_snapshot():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    assert pool.snapshot() is None
    alive, silent = worker("alive", 2), worker("silent", 2)
    alive.expiry, silent.expiry = 100.0, 10.0
    pool.add(alive)
    pool.add(silent)
    assert pool.expired_workers(now=50.0) == [silent]
    pool.remove(silent)
    pool.enqueue(job(1))
    snapshot = pool.snapshot()
    assert snapshot["slots"] == 2 and snapshot["free_slots"] == 2 and snapshot["queued"] == 1
    assert snapshot["kind"] == "chat" and len(snapshot["workers"]) == 1


def test_a_worker_held_after_worker_busy_gets_no_job_until_the_hold_ends():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    liar, honest = worker("liar", 64), worker("honest", 1)
    pool.add(liar)
    pool.add(honest)
    liar.held_until = 10.0
    pool.enqueue(job(1))
    pool.enqueue(job(2))
    assert [w for w, _ in pool.dispatch(now=5.0)] == [honest]  # the other waits rather than bounce
    assert len(pool.queue) == 1
    assert [w for w, _ in pool.dispatch(now=10.0)] == [liar]


def test_a_job_of_several_choices_waits_for_a_worker_with_a_slot_for_each():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    two, three = worker("two", 2), worker("three", 3)
    pool.add(two)
    pool.add(three)
    pool.enqueue(job(1))
    big = Job(job_id=f"{2:032x}", client=b"c", model="m", body={}, enqueued=0.0, slots=3)
    pool.enqueue(big)
    pool.enqueue(job(3))
    sent = pool.dispatch(now=0.0)
    # job 1 takes a slot of "three"; then no worker has 3 free, and job 3 may not overtake job 2
    assert [j.job_id for _, j in sent] == [f"{1:032x}"]
    assert list(pool.queue) == [big, pool.queue[1]]
    three.jobs.clear()
    sent = pool.dispatch(now=0.0)
    assert [(w, j) for w, j in sent][0] == (three, big) and three.free() == 0
    assert [j.job_id for _, j in sent] == [f"{2:032x}", f"{3:032x}"]


def test_a_job_no_worker_could_ever_take_is_taken_out():
    pool = ModelPool("m", queue_size=8, queue_timeout=30)
    assert pool.unfit_jobs() == []  # no worker yet: it may still come
    big = Job(job_id=f"{1:032x}", client=b"c", model="m", body={}, enqueued=0.0, slots=5)
    pool.enqueue(big)
    pool.enqueue(job(2))
    assert pool.unfit_jobs() == []
    pool.add(worker("four", 4))
    assert pool.unfit_jobs() == [big] and [j.job_id for j in pool.queue] == [f"{2:032x}"]
