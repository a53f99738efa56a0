"""SQLite's journal while a study runs: write-ahead log (WAL) for the driver, a plain file at rest.

With SQLite's default rollback journal every commit syncs the database file and its journal,
and a reader holding a read transaction (a dashboard refreshing) blocks the driver's next
commit. The driver commits several times per trial (Optuna's user attributes and ``tell``,
qsearch's trial rows), so this is per-trial overhead. In WAL mode a commit appends to the
``-wal`` side file, readers and the writer do not block each other, and with
``synchronous=NORMAL`` a commit does not wait for the disk (a power cut can lose the last
commits, never corrupt the file). Measured with ``benchmarks/bench_sqlite_journal.py``.

WAL has two costs, and the driver takes it only where neither bites:

- Every process that opens the file must be on the same machine (it shares memory through the
  ``-shm`` file). A file on a network filesystem (NFS, Lustre, CIFS...) keeps the rollback
  journal; ``QSEARCH_SQLITE_WAL`` overrides the detection (``0`` never, ``1`` always).
- While it runs, recent commits live in the ``-wal`` file, so the ``.db`` file alone is not the
  whole study. When the driver stops it switches the file back to the rollback journal, which
  folds the log into the ``.db`` and removes the side files: a finished study is one
  self-contained file again, to copy or open read-only. If another process still has the file
  open (a dashboard), the switch is left to a later driver; SQLite folds the log into the file
  when the last connection closes, and a driver killed mid-study leaves a log that the next
  opener recovers.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from sqlalchemy import Engine, event

from qsearch.config import defaults
from qsearch.errors import ConfigError
from qsearch.store.engine import existing_sqlite_file, synchronous_normal_in_wal

log = logging.getLogger(__name__)

#: Filesystem types (as /proc/self/mountinfo names them) on which SQLite's WAL is unsafe:
#: processes on different machines cannot share its memory-mapped index.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "9p", "afs", "ocfs2",
    "gfs2", "panfs", "wekafs", "fuse.juicefs", "fuse.rclone",
})


def filesystem_type(path: Path, mountinfo: str) -> str | None:
    """The type of the filesystem ``path`` lives on, from the text of ``/proc/self/mountinfo``
    (the mount whose mount point is the longest prefix of the path); None if none matches."""
    best, best_len = None, -1
    parts = Path(path).parts
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        mp_parts = mount_point.parts
        if parts[:len(mp_parts)] == mp_parts and len(mp_parts) > best_len:
            after = line.split(" - ", 1)[1].split()
            if after:
                best, best_len = after[0], len(mp_parts)
    return best


def wal_decision(path: Path) -> tuple[bool, str]:
    """Whether the driver should run ``path`` in WAL mode, and why (for the log)."""
    setting = defaults.sqlite_wal()
    if setting != "auto":
        return setting == "on", f"QSEARCH_SQLITE_WAL={setting}"
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:  # not Linux: a local disk is by far the common case
        return True, "local file (no /proc/self/mountinfo to check)"
    fstype = filesystem_type(path.resolve(), mountinfo)
    if fstype in NETWORK_FILESYSTEMS:
        return False, f"{path} is on a network filesystem ({fstype})"
    return True, f"local file ({fstype or 'unknown filesystem'})"


def sqlite_file(engine: Engine) -> Path | None:
    """The existing file behind a SQLite engine; None for other backends, in-memory
    databases and a file that is not there."""
    try:
        return existing_sqlite_file(engine.url)
    except ConfigError:  # in memory (or not created): nothing to switch
        return None


def journal_mode(path: Path, set_to: str | None = None, timeout: float = 60) -> str:
    """The database file's journal mode as SQLite reports it ('wal', 'delete', ...), after
    switching it to ``set_to`` if given (raises ``sqlite3.Error`` when the switch cannot take
    the lock within ``timeout`` seconds)."""
    conn = sqlite3.connect(path, timeout=timeout)
    try:
        pragma = "PRAGMA journal_mode" + (f"={set_to}" if set_to else "")
        return str(conn.execute(pragma).fetchone()[0]).lower()
    finally:
        conn.close()


def add_wal_hook(engine: Engine) -> bool:
    """Give the connections ``engine`` opens from now on the WAL ``synchronous`` setting
    (engines qsearch did not create, e.g. Optuna's); False for non-SQLite engines."""
    if sqlite_file(engine) is None:
        return False
    event.listen(engine, "connect", synchronous_normal_in_wal)
    return True


class WalWhileRunning:
    """Switches a SQLite study file to WAL for one driver run and back to a plain file after.

    ``start`` with no connection of this process open on the file (connections pick
    ``synchronous`` when they connect, and switching a file back needs it to be the only one);
    ``restore`` after every engine on the file is disposed. Both never raise: the
    journal is a speed setting, never a reason for a study to fail."""

    def __init__(self, engine: Engine):
        self.path = sqlite_file(engine)
        self.switched = False

    def start(self) -> bool:
        if self.path is None:
            return False
        use, why = wal_decision(self.path)
        if not use:
            # A file left in WAL (a driver killed mid-study, a copy of a live store) is
            # switched back, so the setting means what it says.
            try:
                self.switched = self.path.exists() and journal_mode(self.path, timeout=1) == "wal"
            except sqlite3.Error:  # locked by another process: it stays as it is
                self.switched = False
            self.restore()
            log.info("SQLite store keeps the rollback journal: %s", why)
            return False
        try:
            mode = journal_mode(self.path, set_to="WAL")
        except sqlite3.Error as e:
            log.info("SQLite store keeps its journal (switching to WAL failed: %s)", e)
            return False
        self.switched = mode == "wal"
        log.info("SQLite store in WAL mode while the study runs (%s)", why)
        return self.switched

    def restore(self) -> bool:
        """Back to the rollback journal, folding the log into the file; False (and the file
        left in WAL) while another process still has it open."""
        if not self.switched:
            return False
        try:
            mode = journal_mode(self.path, set_to="DELETE", timeout=1)
        except sqlite3.Error as e:
            log.info("SQLite store left in WAL mode (another process has it open: %s); the "
                     "next driver switches it back", e)
            return False
        self.switched = mode != "delete"
        return not self.switched
