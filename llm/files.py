"""Writing so that no reader ever sees half a file: every write goes to a temporary name beside
the target, is flushed to disk, and is then renamed over the target (atomic on POSIX).

This is the one place that does write-then-replace; everything that publishes a file or a
directory (configs, commit records, shards, tokenizers, eval results, whole data directories) goes
through `atomic_path`.
"""
import contextlib
import json
import os
import shutil


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; when the block succeeds, what was written there (a
    file or a directory) replaces `path`; when it fails, it is removed and `path` is untouched.

    A directory cannot be renamed over an existing one, so an existing directory `path` is first
    renamed aside to `path.old.<pid>`, the new one renamed into place, then the old one removed: a
    crash between the two renames leaves the old directory whole at `path.old.<pid>`, never a
    half-written `path`. A file gets the mode `open` would give it (0666 less the umask),
    whatever the writer chose (safetensors writes 0600)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    remove(tmp)  # left by a crashed process that had our pid
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        _replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def _replace(tmp: str, path: str) -> None:
    if os.path.isdir(tmp) and os.path.isdir(path) and not os.path.islink(path):
        old = f"{path}.old.{os.getpid()}"
        remove(old)
        os.rename(path, old)
        os.rename(tmp, path)
        remove(old)
    else:
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it
    os.umask(mask)
    return mask


def write_atomic(path: str, data) -> None:
    """Write `data` (str or bytes) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json(path: str, obj, **dump_args) -> None:
    write_atomic(path, json.dumps(obj, indent=1, **dump_args))


def remove(path: str) -> None:
    """Remove a file or a directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
