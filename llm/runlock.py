"""One trainer per run directory: `<out_dir>/train.lock`, a JSON file naming the holder (host, pid,
start time, command line), created exclusively by rank 0 before it writes anything there and
removed when the job ends (whatever the exit). A lock left behind by a process that is no longer
running on this host (killed with SIGKILL, a crashed node's restart) is taken over, with a message;
a live holder, or one on another host (which cannot be checked from here), fails the second
trainer. (Two trainers taking over the same stale lock at the same instant is not guarded against.)
"""
import json
import os
import socket
import sys
import time

LOCK = "train.lock"


class RunDirLocked(RuntimeError):
    """Another trainer holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """`with RunLock(out_dir):` holds the run directory's lock for the block (inactive: does nothing)."""

    def __init__(self, out_dir: str, active: bool = True):
        self.dir, self.active, self.held, self.made_dir = os.path.abspath(out_dir), active, False, False
        self.path = os.path.join(self.dir, LOCK)

    def __enter__(self):
        if self.active:
            self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self) -> None:
        self.made_dir = not os.path.isdir(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        ours = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(self._holder())
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(ours, f)
            self.held = True
            return

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}  # released meanwhile: try again
        except (OSError, ValueError) as e:
            raise RunDirLocked(f"{self.path}: unreadable lock ({e}); if no trainer is using {self.dir}, "
                               f"delete the file") from None

    def _take_over_if_stale(self, holder: dict) -> None:
        if not holder:
            return
        who = f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
        if holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", 0))):
            raise RunDirLocked(f"train.out_dir={self.dir} is in use by another trainer: {who}, "
                               f"`{holder.get('command')}` (lock {self.path}). Wait for it to end, or choose another "
                               f"train.out_dir; if that trainer is gone, delete the lock file")
        print(f"taking over the stale lock {self.path} of {who}, which is no longer running", flush=True)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if it is ours (and the run directory, if this lock made it and it is empty)."""
        if not self.held:
            return
        self.held = False
        if self._holder().get("pid") == os.getpid():
            os.remove(self.path)
        if self.made_dir:
            try:
                os.rmdir(self.dir)  # only when empty: inputs that failed their checks leave nothing behind
            except OSError:
                pass
