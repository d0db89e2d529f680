"""Small file helpers shared by the readers and the atomic writers (checkpoints, exports, imports)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Optional

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


# A published directory (an export, an imported checkpoint) is read by other users, as any model directory
# is: a server or a colleague's job may run under another account. ``tempfile.mkdtemp`` creates its directory
# 0700 and a restrictive umask (077) makes every file 0600, so the modes are set explicitly when publishing.
PUBLISHED_DIR_MODE = 0o755
PUBLISHED_FILE_MODE = 0o644


def set_published_modes(directory: str) -> None:
    """Directories 0755 and regular files 0644 under (and including) ``directory``, whatever the umask."""
    os.chmod(directory, PUBLISHED_DIR_MODE)
    for root, dirs, names in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), PUBLISHED_DIR_MODE)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, PUBLISHED_FILE_MODE)


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished ``tmp`` to ``out_dir`` with published modes (directories 0755, files 0644); an
    existing ``out_dir`` is set aside first and removed only after the rename (put back if the rename
    fails), so a crash never leaves neither."""
    set_published_modes(tmp)
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


# Writers for checkpoints and exports. torch.save and safetensors' save_file report a full disk as a
# RuntimeError ("unexpected pos ...") or a SafetensorError, not as OSError(ENOSPC); serialising to memory
# first and writing the bytes with plain file I/O makes every failure to write an OSError that names errno.


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` (tensors and plain values: read back with ``weights_only=True``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


# A manifest of a directory's files (size and SHA-256 of each), written last before a directory is
# declared complete and checked before it is read: a truncated or altered file under a completion marker
# (a copy cut short, a disk that lost a block) is named instead of being loaded as garbage.
MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"  # the marker a checkpoint directory gets last, after its manifest


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str, exclude: tuple[str, ...] = (), exclude_dirs: tuple[str, ...] = ()) -> None:
    """``MANIFEST.json``: size and SHA-256 of every file under ``directory`` but ``exclude`` and the files
    under the subdirectories ``exclude_dirs`` (another directory's own contents)."""
    skip = tuple(d.rstrip("/") + "/" for d in exclude_dirs)
    entries = {rel: {"bytes": os.path.getsize(os.path.join(directory, rel)), "sha256": sha256_file(os.path.join(directory, rel))}
               for rel in _files(directory) if rel not in exclude and not rel.startswith(skip)}
    write_bytes(os.path.join(directory, MANIFEST), (json.dumps({"files": entries}, indent=1) + "\n").encode())


def verify_manifest(directory: str, what: str, exclude: tuple[str, ...] = ()) -> bool:
    """Check every file against ``MANIFEST.json``; False when the directory has none (written by an older
    version), UserError naming the first file that is missing, extra, truncated or changed."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return False
    entries = read_json(path, f"{path}: missing")["files"]
    present = {rel for rel in _files(directory) if rel not in exclude}
    for rel in sorted(set(entries) - present):
        raise UserError(f"{what} {directory}: {rel} is listed in {MANIFEST} but missing")
    for rel in sorted(present - set(entries)):
        raise UserError(f"{what} {directory}: {rel} is not in {MANIFEST} (added after the directory was completed)")
    for rel in sorted(entries):
        want = entries[rel]
        size = os.path.getsize(os.path.join(directory, rel))
        if size != want["bytes"]:
            raise UserError(f"{what} {directory}: {rel} has {size} bytes, {MANIFEST} says {want['bytes']} "
                            "(truncated or replaced)")
        if sha256_file(os.path.join(directory, rel)) != want["sha256"]:
            raise UserError(f"{what} {directory}: {rel} does not match its SHA-256 in {MANIFEST} (corrupted)")
    return True


def open_safetensors(path: str):
    """``safe_open`` with a damaged file (truncated, not safetensors, a bad header) reported as one line naming
    it: safetensors checks that the header's offsets cover the file, so a shard cut short fails here."""
    try:
        from safetensors import safe_open

        return safe_open(path, framework="pt")
    except Exception as exc:  # SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(f"{path}: not a readable safetensors file ({exc}): truncated or corrupted? "
                        f"{os.path.getsize(path)} bytes on disk") from None
