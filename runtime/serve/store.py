"""The job store of ``foresight-serve``: one SQLite file, the queue and the record of every job.

A job row holds the request as the server accepted it (``params``, validated JSON), its state,
its progress and, once done, where its video is and the generation's stats. States::

    queued -> running -> completed | failed | cancelled
    queued -> cancelled

The store is the queue: a worker claims the oldest queued job of its model in one
transaction, so no job is handed out twice. Nothing lives only in memory: after a crash or a
kill, :meth:`JobStore.recover` puts every job left ``running`` back in the queue (or fails it,
with the reason, once it has been interrupted ``max_attempts`` times), and queued and finished
jobs are simply still there. Standard library only; safe to use from many threads (one
connection, serialised by a lock; SQLite's WAL journal keeps the file consistent across kills).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
STATES = ("queued", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,            -- submission order (the queue's order)
    model TEXT NOT NULL,
    params TEXT NOT NULL,            -- the accepted request, JSON
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,   -- times a worker started it
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    layers_skipped INTEGER NOT NULL DEFAULT 0,
    layers_total INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error TEXT,
    worker TEXT,                     -- who runs (ran) it: "pid N" of the process or Ray replica
    result TEXT,                     -- the video's file name inside the data folder's videos/
    stats TEXT                       -- the generation's stats (without the trace), JSON
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, model, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    params: dict
    state: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    step: int
    steps: int
    layers_skipped: int
    layers_total: int
    cancel_requested: bool
    error_code: str | None
    error: str | None
    worker: str | None
    result: str | None
    stats: dict | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        d.pop("seq")
        d["params"] = json.loads(d["params"])
        d["stats"] = json.loads(d["stats"]) if d["stats"] else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


class StoreError(Exception):
    """The data folder's job store cannot be used (another version, not a store)."""


class JobStore:
    def __init__(self, path: str | Path, max_attempts: int = 2):
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a foresight-serve job store ({exc}): pass another --data-dir") from None
        if found is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(found["value"]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} is a job store of schema {found['value']}; this server reads schema "
                             f"{SCHEMA_VERSION}: pass another --data-dir")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction (BEGIN IMMEDIATE: the write lock up front), committed or rolled back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _tx(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._transaction() as db:
            return db.execute(sql, args).fetchall()

    def submit(self, model: str, params: dict, max_queue: int | None = None) -> Job | None:
        """A new queued job, or None when ``max_queue`` jobs are already queued (checked in the
        same transaction as the insert, so concurrent submissions cannot overshoot it)."""
        job_id = "video_" + uuid.uuid4().hex
        with self._transaction() as db:
            if max_queue is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
                if queued >= max_queue:
                    return None
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
            db.execute("INSERT INTO jobs (id, seq, model, params, state, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
                       (job_id, seq, model, json.dumps(params), time.time()))
        return self.get(job_id)

    def claim(self, models) -> Job | None:
        """The oldest queued job of one of ``models``, now ``running`` (attempts + 1), or None."""
        models = list(models)
        marks = ",".join("?" * len(models))
        rows = self._tx(
            f"UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, step = 0 "
            f"WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND model IN ({marks}) ORDER BY seq LIMIT 1) "
            f"RETURNING *", (time.time(), *models))
        return Job.from_row(rows[0]) if rows else None

    def progress(self, job_id: str, step: int, steps: int, layers_skipped: int, layers_total: int) -> bool:
        """Record progress of a running job; returns whether a cancel was requested."""
        rows = self._tx("UPDATE jobs SET step = ?, steps = ?, layers_skipped = ?, layers_total = ? "
                        "WHERE id = ? AND state = 'running' RETURNING cancel_requested",
                        (step, steps, layers_skipped, layers_total, job_id))
        return bool(rows and rows[0]["cancel_requested"])

    def set_worker(self, job_id: str, worker: str) -> None:
        self._tx("UPDATE jobs SET worker = ? WHERE id = ?", (worker, job_id))

    def complete(self, job_id: str, result: str, stats: dict) -> None:
        self._tx("UPDATE jobs SET state = 'completed', finished_at = ?, result = ?, stats = ? "
                 "WHERE id = ? AND state = 'running'", (time.time(), result, json.dumps(stats), job_id))

    def fail(self, job_id: str, code: str, message: str) -> None:
        self._tx("UPDATE jobs SET state = 'failed', finished_at = ?, error_code = ?, error = ? "
                 "WHERE id = ? AND state IN ('queued', 'running')", (time.time(), code, message, job_id))

    def finish_cancelled(self, job_id: str) -> None:
        self._tx("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND state = 'running'",
                 (time.time(), job_id))

    def requeue(self, job_id: str, reason: str, counts: bool = True) -> str:
        """Put a running job back in the queue, or fail it with ``reason`` once it has been started
        ``max_attempts`` times; returns the new state. ``counts=False`` (a graceful shutdown stopped it
        between steps) re-queues it without using up an attempt."""
        if not counts:
            rows = self._tx("UPDATE jobs SET state = 'queued', attempts = attempts - 1, step = 0, layers_skipped = 0, "
                            "started_at = NULL WHERE id = ? AND state = 'running' RETURNING state", (job_id,))
            return rows[0]["state"] if rows else ""
        limit = self.max_attempts
        rows = self._tx(
            "UPDATE jobs SET "
            "state = CASE WHEN attempts >= :limit THEN 'failed' ELSE 'queued' END, "
            "error_code = CASE WHEN attempts >= :limit THEN 'interrupted' END, "
            "error = CASE WHEN attempts >= :limit THEN :reason || ' (started ' || attempts || ' times; not retried)' END, "
            "finished_at = CASE WHEN attempts >= :limit THEN :now END, "
            "step = 0, layers_skipped = 0 WHERE id = :id AND state = 'running' RETURNING state",
            {"limit": limit, "reason": reason, "now": time.time(), "id": job_id})
        return rows[0]["state"] if rows else ""

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; ask a running one to stop at its next step. None: no such job."""
        self._tx("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ? AND state = 'queued'",
                 (time.time(), job_id))
        self._tx("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        return bool(self._tx("DELETE FROM jobs WHERE id = ? RETURNING id", (job_id,)))

    def recover(self, reason: str = "the server stopped while this job ran") -> dict[str, list[str]]:
        """At start-up: every job left ``running`` (the last server was killed) is re-queued or failed."""
        with self._lock:
            running = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state = 'running'")]
        out = {"queued": [], "failed": []}
        for job_id in running:
            state = self.requeue(job_id, reason)
            if state in out:
                out[state].append(job_id)
        return out

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, limit: int = 20, after: str | None = None, newest_first: bool = True) -> list[Job]:
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            if after:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    return []
                cmp = "<" if newest_first else ">"
                rows = self._db.execute(f"SELECT * FROM jobs WHERE seq {cmp} ? ORDER BY seq {order} LIMIT ?",
                                        (row["seq"], limit)).fetchall()
            else:
                rows = self._db.execute(f"SELECT * FROM jobs ORDER BY seq {order} LIMIT ?", (limit,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        found = {r["state"]: r["n"] for r in rows}
        return {s: found.get(s, 0) for s in STATES}

    def queue_position(self, job: Job) -> int:
        """How many queued jobs of the same model are ahead of ``job``."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND model = ? AND seq < "
                                    "(SELECT seq FROM jobs WHERE id = ?)", (job.model, job.id)).fetchone()
        return n
