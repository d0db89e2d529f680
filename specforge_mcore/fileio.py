"""Small file helpers shared by the readers and the atomic writers (checkpoints, exports, imports)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from specforge_mcore.errors import UserError


def read_json(path: str, missing: str) -> Any:
    """The JSON document at ``path``; ``missing`` is the whole message when the file is not there, and a
    file that is not valid JSON is an error naming it."""
    if not os.path.isfile(path):
        raise UserError(missing)
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is set aside first and removed only
    after the rename (put back if the rename fails), so a crash never leaves neither."""
    parent = os.path.dirname(out_dir)
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "previous"))
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(os.path.join(old, "previous"), out_dir)
            os.rmdir(old)
        raise
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old)
