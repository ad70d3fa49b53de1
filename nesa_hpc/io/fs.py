"""Which file system a path lives on, and whether other nodes may mount it.

Rank 0's own files (results of private rows, noise keys) must stay where the workers cannot read them. A
path on a network or parallel file system (NFS, Lustre, GPFS, BeeGFS, CephFS, ...) is usually mounted by
every node of a cluster, the workers' included; a node-local disk or tmpfs is not.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NETWORK_FS", "mount_of", "network_fs"]

NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.cephfs", "glusterfs",
    "fuse.glusterfs", "panfs", "afs", "fuse.sshfs", "wekafs", "fuse.juicefs", "fuse.s3fs", "fuse.rclone",
    "fuse.gcsfuse", "9p", "virtiofs", "orangefs", "pvfs2", "ocfs2", "gfs2"})


def _unescape(field: str) -> str:
    """A /proc/mounts field: spaces, tabs, newlines and backslashes are written as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: str | Path, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, file system type) of ``path`` (or of its nearest existing parent), from ``mounts`` (the
    text of /proc/self/mounts, read when None); ("", "") when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return "", ""
    target = Path(os.path.abspath(Path(path).expanduser()))
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best = ("", "")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point, fstype = _unescape(parts[1]), parts[2]
        inside = target == Path(point) or Path(point) in target.parents
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def network_fs(path: str | Path, mounts: str | None = None) -> str | None:
    """The type of the network or parallel file system ``path`` lives on, or None (local or unknown)."""
    fstype = mount_of(path, mounts)[1]
    return fstype if fstype in NETWORK_FS or fstype.startswith("nfs") else None
