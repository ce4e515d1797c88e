"""Who this process is among replicas, and which lease owners are provably dead.

A lease owner is `host:pid:tag`: the host and pid say where the process runs, the random
tag tells two incarnations with the same pid apart (a container restarted as pid 1).
Lease expiry is the general rule for taking over a dead replica's files, but a replica
can prove more on its own host: an owner there whose pid is gone, or whose pid is its
own under another tag, is dead now.  So a restarted process resumes its predecessor's
work at once instead of after a lease.  This assumes replicas' host names are unique.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

HOST_CHARS = 40


@dataclass(frozen=True)
class Replica:
    host: str
    pid: int
    tag: str

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}:{self.tag}"


def this_process() -> Replica:
    return Replica(socket.gethostname()[:HOST_CHARS], os.getpid(), secrets.token_hex(4))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def dead_here(owner: str, me: Replica) -> bool:
    """Whether `owner` is a process on this host that no longer runs."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or owner == me.owner:
        return False
    host, pid, _tag = parts[0], int(parts[1]), parts[2]
    if host != me.host:
        return False
    return pid == me.pid or not _pid_alive(pid)
