"""Folders that appear whole: a reader never sees half of one, and two writers never tear one apart.

Presets, training exports and caches are written into a staging folder beside their destination and
moved into place in one rename; `publish_folder` also copies a finished local folder to a URI
(s3://, gs://) for Ray Train's storage. `file_lock` serializes builders of the same thing across
processes and Ray workers on one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock on `path` (created if missing) for the duration of the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged_folder(destination: str):
    """Yield an empty folder beside `destination`; when the block ends without an error it becomes
    `destination` (replacing a folder there), else it is removed."""
    staging = f"{destination}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(staging)
    try:
        yield staging
        _swap_in(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_folder(source: str, destination: str) -> None:
    """Put a copy of the local folder `source` at `destination`, a local path (replaced whole) or a URI."""
    if "://" in destination:
        import pyarrow.fs

        pyarrow.fs.copy_files(source, destination)
        return
    with staged_folder(destination) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)


def _swap_in(staging: str, destination: str) -> None:
    """A rename cannot replace a non-empty folder: the old one is renamed away first, then removed."""
    old = None
    if os.path.exists(destination):
        old = f"{destination}.old-{uuid.uuid4().hex[:12]}"
        os.replace(destination, old)
    os.replace(staging, destination)
    if old:
        shutil.rmtree(old, ignore_errors=True)
