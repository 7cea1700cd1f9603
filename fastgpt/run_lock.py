"""One training run per output folder.

``fastgpt train`` holds an exclusive ``flock`` on ``<out>/.fastgpt-run.lock`` while it runs, so a
second run on the same folder fails at once instead of both writing the same checkpoint. The
kernel drops the lock when the process ends, however it ends (``kill -9`` too), so a lock is never
left stale. The file itself stays (deleting it would race with a run that has just opened it); it
holds the pid of the run that holds, or last held, the lock, which the refusal names. POSIX only;
``flock`` on some network file systems does not lock across machines.
"""

import fcntl
import os

LOCK_NAME = ".fastgpt-run.lock"


class FolderInUse(RuntimeError):
    """Another process holds the folder's run lock."""


class RunLock:
    """``with RunLock(folder):`` (or ``acquire()`` ... ``release()``) holds ``folder``'s run lock.
    Raises ``FolderInUse`` when another process holds it, ``OSError`` when the lock file cannot be
    created (e.g. the folder is read-only)."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd = None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # keeps the holder's pid
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(
                f"{self.folder} is in use by another fastgpt run (pid {holder}); "
                "wait for it to end or choose another --out"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self):
        os.close(self._fd)  # closing the last descriptor releases the lock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
