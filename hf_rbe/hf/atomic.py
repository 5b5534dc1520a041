"""Writing a checkpoint directory so that a reader finds the old checkpoint or the new one, never a mix.

``replace_directory(target)`` is a context manager that yields an empty staging directory beside
``target`` (the real one, symlinks resolved, so the final rename stays on one filesystem). The
caller writes the complete new checkpoint there; on a clean exit the files of ``target`` that the
new one does not replace (a tokenizer, a user's README; old weight files excepted) are linked in
beside it and the two directories swap names in one ``renameat2(RENAME_EXCHANGE)`` call: a kill
at any point leaves ``target`` whole, old or new. Where the kernel or filesystem cannot exchange
(not Linux, some network filesystems) the files are moved in one by one, config.json last: a kill
during those renames can leave a mix.

Writers into one parent directory take turns: an ``flock`` on the parent (no lock file; the
kernel releases it when its process dies), held from before the staging directory is made until
after the swap, so two processes saving the same checkpoint write one after the other and the
last one's model is what stays. Staging and swapped-out directories that a killed writer left
behind are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; writers are not serialised there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# A checkpoint's weight files (single, sharded, index): the new save replaces all of them.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange_call():  # type: ignore[no-untyped-def]
    """glibc's ``renameat2`` (2.28+), or None where there is none: Python's ``os`` has no binding."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _exchange_call()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names of directories ``a`` and ``b`` atomically; False where this system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EBUSY):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def resolve_target(directory: str | os.PathLike[str]) -> Path:
    """The real directory a save into ``directory`` writes (symlinks followed); refuses an empty path
    (it would mean the current directory) and a file."""
    if str(directory) == "":
        raise ValueError("save directory is '' (the current directory): name a directory")
    target = Path(os.path.realpath(directory))
    if target.is_file():
        raise NotADirectoryError(f"{directory} is a file; pass a directory")
    return target


def _leftover(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.glob(f".{glob.escape(name)}.saving-*") if p.is_dir() and not p.is_symlink()]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` for the block (waits for another holder)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # ENOLCK / EOPNOTSUPP: some network filesystems have no flock
            logger.warning("%s: cannot lock (%s); concurrent saves here are not serialised", directory, err)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def replace_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a staging directory; on a clean exit it becomes ``directory`` (module docstring)."""
    target = resolve_target(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        for stale in _leftover(target.parent, target.name):  # no writer holds the lock: a killed one's
            logger.info("removing %s, left by an interrupted save", stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            yield staging
            _commit(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old checkpoint


def _commit(staging: Path, target: Path) -> None:
    """Make the complete save in ``staging`` the contents of ``target`` (module docstring)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~umask)  # mkdtemp made it 0700
    if not target.exists():
        os.replace(staging, target)
        return
    new = {p.name for p in staging.iterdir()}
    for old in target.iterdir():
        if old.name not in new and not WEIGHT_FILE.match(old.name):
            if old.is_dir() and not old.is_symlink():
                shutil.copytree(old, staging / old.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(old, staging / old.name)
    if exchange(staging, target):
        return
    logger.warning("%s: this filesystem cannot swap directories atomically; moving files one by one", target)
    _move_files(staging, target, new)


def _link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _move_files(staging: Path, target: Path, new: set[str]) -> None:
    """The fallback: the new files renamed in (weights first, config.json last), then the old
    checkpoint's weight files that the new one does not have removed."""
    for name in sorted(new, key=lambda n: (n == "config.json", not n.endswith(".safetensors"), n)):
        if (staging / name).is_dir():
            shutil.copytree(staging / name, target / name, dirs_exist_ok=True)
        else:
            os.replace(staging / name, target / name)
    for old in target.iterdir():
        if old.name not in new and WEIGHT_FILE.match(old.name):
            old.unlink()
