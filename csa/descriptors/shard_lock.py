"""One extraction run at a time in a shard folder: a lock file per process, marked with the run it belongs to.

Every process of a run writes ``<folder>/locks/<host>-<pid>.lock`` (its run id, host, pid, rank, start
time) and then reads the others.  Locks of the same run (the other ranks) are expected; a lock of another
run is taken over when its process is gone (same host, pid no longer running: a killed run), otherwise the
newcomer removes its own lock and is refused with :class:`ShardFolderBusy`, naming the holder.  Two runs
that start at the same moment both see each other and both are refused: the folder is never written by two
runs.  A lock left on another machine cannot be checked; the message says which file to delete.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from csa.descriptors.distributed import Ranks
from csa.fileio import atomic_write
from csa.validation import CSAError

__all__ = ["ShardFolderBusy", "ShardFolderLock", "process_alive"]


class ShardFolderBusy(CSAError):
    """Another extraction that is still running holds the shard folder."""


def process_alive(pid: int) -> bool:
    """True when process ``pid`` runs on this machine (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class ShardFolderLock:
    """Context manager holding ``folder`` for this process's run; :meth:`release` may come earlier."""

    def __init__(self, folder: str | os.PathLike, ranks: Ranks | None = None):
        self.folder = Path(folder)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.run = ranks.run_id if ranks is not None and ranks.run_id else f"{self.host}-{self.pid}-{uuid.uuid4().hex}"
        self.rank = 0 if ranks is None else ranks.rank
        self.path = self.folder / "locks" / f"{self.host}-{self.pid}.lock"
        self.held = False

    def acquire(self) -> "ShardFolderLock":
        info = {"run": self.run, "host": self.host, "pid": self.pid, "rank": self.rank,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        with atomic_write(self.path, "w") as f:
            json.dump(info, f)
        self.held = True
        for other in sorted(self.path.parent.glob("*.lock")):
            if other != self.path:
                self._check(other)
        return self

    def _check(self, other: Path) -> None:
        """Accept a lock of this run, take over a dead process's lock, refuse any other."""
        try:
            holder = json.loads(other.read_text())
            run, host, pid = holder["run"], holder["host"], int(holder["pid"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            self.release()
            raise ShardFolderBusy(f"{self.folder} has an unreadable lock file {other}; if no extraction is "
                                  f"running there, delete it and run again") from None
        if run == self.run:
            return
        if host == self.host and not process_alive(pid):
            other.unlink(missing_ok=True)  # a killed run: its finished shards are kept, its work taken over
            return
        self.release()
        where = "this machine" if host == self.host else f"host {host}"
        raise ShardFolderBusy(f"{self.folder} is being written by another extraction (pid {pid} on {where}, rank "
                              f"{holder.get('rank', '?')}, since {holder.get('started', '?')}); wait for it to "
                              f"finish, or delete {other} if that process is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # other ranks' locks are still there, or the folder was removed

    def __enter__(self) -> "ShardFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
