"""Small file helpers shared by the modules that write files (masks, deltas)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Mapping


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



def safetensors_bytes(tensors: Mapping, metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save``, with a reproducible header: safetensors writes the metadata in
    a per-process random (hash) order, so equal content gave files of different bytes. The header
    is rewritten with sorted keys (the tensor data and its offsets are unchanged), so equal
    content always gives the same file."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata is not None else None)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the header stays 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]
