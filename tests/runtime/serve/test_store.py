"""The SQLite job store: queue order, one claim per job, atomic queue bound, recovery after a kill."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from runtime.serve.store import JobStore, StoreError


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite3", max_attempts=2)
    yield s
    s.close()


def test_jobs_are_claimed_in_submission_order_per_model(store):
    a = store.submit("m1", {"prompt": "a"})
    b = store.submit("m2", {"prompt": "b"})
    c = store.submit("m1", {"prompt": "c"})
    assert store.claim(["m1"]).id == a.id
    assert store.claim(["m1"]).id == c.id
    assert store.claim(["m1"]) is None
    got = store.claim(["m1", "m2"])
    assert got.id == b.id and got.state == "running" and got.attempts == 1 and got.params == {"prompt": "b"}


def test_no_job_is_claimed_twice_by_concurrent_workers(store):
    ids = {store.submit("m", {"i": i}).id for i in range(60)}
    claimed, lock = [], threading.Lock()

    def worker():
        while (job := store.claim(["m"])) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_the_queue_bound_holds_under_concurrent_submissions(store):
    results = []

    def submit():
        results.append(store.submit("m", {}, max_queue=5))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 5
    assert store.counts()["queued"] == 5


def test_progress_cancel_and_end_states(store):
    job = store.submit("m", {})
    queued = store.submit("m", {})
    store.claim(["m"])
    assert store.progress(job.id, 3, 10, 4, 60) is False
    got = store.get(job.id)
    assert (got.step, got.steps, got.layers_skipped, got.layers_total) == (3, 10, 4, 60)
    assert store.cancel(queued.id).state == "cancelled"  # a queued job at once
    assert store.cancel(job.id).state == "running"  # a running one when it next reports
    assert store.progress(job.id, 4, 10, 4, 60) is True
    store.finish_cancelled(job.id)
    assert store.get(job.id).state == "cancelled"
    done = store.submit("m", {})
    store.claim(["m"])
    store.complete(done.id, "x.mp4", {"steps": 1})
    got = store.get(done.id)
    assert got.state == "completed" and got.result == "x.mp4" and got.stats == {"steps": 1}
    store.fail(done.id, "x", "y")  # a finished job stays finished
    assert store.get(done.id).state == "completed"
    assert store.counts() == {"queued": 0, "running": 0, "completed": 1, "failed": 0, "cancelled": 2}


def test_recover_requeues_running_jobs_then_fails_them_with_the_reason(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    s = JobStore(path, max_attempts=2)
    job = s.submit("m", {"prompt": "p"})
    s.claim(["m"])
    s.close()  # the server was killed while the job ran

    s = JobStore(path, max_attempts=2)
    assert s.recover() == {"queued": [job.id], "failed": []}
    assert s.get(job.id).state == "queued" and s.get(job.id).params == {"prompt": "p"}
    assert s.claim(["m"]).attempts == 2
    s.close()  # killed again during its second attempt

    s = JobStore(path, max_attempts=2)
    assert s.recover() == {"queued": [], "failed": [job.id]}
    got = s.get(job.id)
    assert got.state == "failed" and got.error_code == "interrupted"
    assert "stopped while this job ran" in got.error and "2 times" in got.error
    s.close()


def test_a_graceful_requeue_does_not_use_up_an_attempt(store):
    job = store.submit("m", {})
    store.claim(["m"])
    assert store.requeue(job.id, "stopping", counts=False) == "queued"
    assert store.get(job.id).attempts == 0
    assert store.claim(["m"]).attempts == 1


def test_finished_jobs_survive_reopening_and_list_pages(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    s = JobStore(path)
    ids = [s.submit("m", {"i": i}).id for i in range(5)]
    s.close()
    s = JobStore(path)
    assert [j.id for j in s.list(2)] == ids[::-1][:2]
    assert [j.id for j in s.list(2, after=ids[3])] == [ids[2], ids[1]]
    assert [j.id for j in s.list(10, newest_first=False)] == ids
    assert s.list(5, after="video_unknown") == []
    s.close()


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a foresight-serve job store"):
        JobStore(path)
    assert path.read_bytes() == b"not a database" * 100


def test_a_store_of_another_schema_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 99"):
        JobStore(path)
