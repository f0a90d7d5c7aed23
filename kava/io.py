"""Atomic writes: nothing appears under its final name until it is complete."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(final, is_dir=False):
    """Yield a temporary sibling of `final` (file or directory); rename it into place only if
    the block succeeds, otherwise delete it. Same directory, so the rename is atomic."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(handle)
        tmp = Path(name)
    # mkstemp/mkdtemp make private (0600/0700) entries; results are shared with a group on a
    # cluster, so give them the permissions an ordinary open() would.
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(final):
    """Delete the temporaries atomic_path made for `final` in a process that was killed (kill -9
    runs no cleanup). Only for a caller that is the sole writer of `final`."""
    final = Path(final)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())
