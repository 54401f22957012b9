"""Small file helpers shared by the modules that write files (masks, deltas)."""
from __future__ import annotations

import errno
import os
import shutil
import uuid


def write_atomic(where: str, data: bytes, what: str) -> None:
    """Write ``data`` to a temporary file next to ``where`` and rename it over ``where``."""
    final = os.path.realpath(where)
    if os.path.isdir(final):
        raise IsADirectoryError(errno.EISDIR, f"cannot write the {what} file (it is a directory)", where)
    directory, name = os.path.split(final)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        if os.path.isfile(final):
            shutil.copymode(final, tmp)
        os.replace(tmp, final)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.errno is not None:
            raise type(e)(e.errno, f"cannot write the {what} file ({e.strerror})", where) from e
        raise

