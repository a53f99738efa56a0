"""The driver lease: at most one live driver per study.

The lease lives in the study row (``lease_host``, ``lease_pid``, ``lease_token``,
``lease_heartbeat_at``). Taking it is a compare-and-swap on the old token; a lease whose
heartbeat is older than ``QSEARCH_LEASE_TIMEOUT_S`` (read when it is checked), or whose
holder is a dead process on this host, is free.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from sqlalchemy import select, update

from qsearch.config import defaults
from qsearch.errors import StorageError
from qsearch.store import schema as s
from qsearch.store.engine import Database, retried, utcnow

log = logging.getLogger(__name__)


class LeaseError(StorageError):
    """Another live driver holds the study (message names its host and pid)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@retried
def acquire_lease(db: Database, study_id: int, *, host: str | None = None,
                  pid: int | None = None, stale_after_s: float | None = None) -> str:
    """Make this process the study's only driver; returns the lease token.

    A lease is free when nobody holds it, when its heartbeat is older than
    ``stale_after_s`` (default ``QSEARCH_LEASE_TIMEOUT_S``), or when its holder is a dead
    process on this same host. Otherwise :class:`LeaseError` says who holds it. The take-over
    is a compare-and-swap on the old token, so two drivers racing for a free lease cannot
    both win.
    """
    host = host or socket.gethostname()
    pid = pid if pid is not None else os.getpid()
    stale = defaults.lease_timeout_s() if stale_after_s is None else stale_after_s
    now = utcnow()
    token = uuid.uuid4().hex
    with db.tx("acquire driver lease") as conn:
        row = conn.execute(select(s.studies).where(s.studies.c.id == study_id)).one()
        old = row.lease_token
        if old is not None:
            age = (now - row.lease_heartbeat_at).total_seconds() if row.lease_heartbeat_at \
                else float("inf")
            dead_here = row.lease_host == socket.gethostname() and row.lease_pid is not None \
                and not _pid_alive(int(row.lease_pid))
            # Our own lease: a retried acquisition whose first commit did go through.
            mine = row.lease_host == host and row.lease_pid == pid
            if age < stale and not dead_here and not mine:
                raise LeaseError(
                    f"study {row.name!r} is already being run by another driver (host "
                    f"{row.lease_host}, pid {row.lease_pid}, heartbeat {age:.0f} s ago); "
                    f"wait for it to finish, or relaunch once its heartbeat is older than "
                    f"{stale:.0f} s if it died")
            if not mine:
                log.warning("taking over study %s from driver host %s pid %s (heartbeat "
                            "%.0f s ago)", row.name, row.lease_host, row.lease_pid, age)
        cond = s.studies.c.lease_token.is_(None) if old is None else \
            s.studies.c.lease_token == old
        res = conn.execute(update(s.studies).where(s.studies.c.id == study_id, cond).values(
            lease_host=host, lease_pid=pid, lease_token=token, lease_heartbeat_at=now,
            status="running", updated_at=now, finished_at=None))
        if res.rowcount != 1:
            raise LeaseError(f"study {row.name!r}: another driver took the lease at the "
                             "same moment; try again")
    return token


@retried
def heartbeat(db: Database, study_id: int, token: str) -> bool:
    """Refresh the lease; False if this driver no longer holds it."""
    with db.tx("refresh driver lease") as conn:
        res = conn.execute(update(s.studies).where(
            s.studies.c.id == study_id, s.studies.c.lease_token == token).values(
            lease_heartbeat_at=utcnow()))
    return res.rowcount == 1


@retried
def release_lease(db: Database, study_id: int, token: str, status: str) -> None:
    now = utcnow()
    with db.tx("release driver lease") as conn:
        conn.execute(update(s.studies).where(
            s.studies.c.id == study_id, s.studies.c.lease_token == token).values(
            lease_host=None, lease_pid=None, lease_token=None, lease_heartbeat_at=None,
            status=status, updated_at=now,
            finished_at=now if status == "finished" else None))
