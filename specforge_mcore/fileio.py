"""Small file helpers shared by the readers and the atomic writers (checkpoints, exports, imports)."""

from __future__ import annotations

import json
import os
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
