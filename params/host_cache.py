"""One network fetch per host and version, shared by the clients of a host through a private
directory (ParameterClient(host_cache=...)).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Tuple

import numpy as np
from google.protobuf.message import DecodeError

from params.wire import PROTOCOL_VERSION
from protos import params_pb2


class _HostCache:
    """Params shared by the processes of one host (actors on one machine): one network fetch
    per version, subset and wire dtype, instead of one per process.

    The process that takes an entry's lock (flock, released by the kernel if it dies) fetches
    the version over gRPC, checks its size and sha256 as usual, writes the header and payload to
    a temporary file in `directory` and renames it over the entry, so readers see a whole file or
    the previous one. The others read the file (one copy) instead of streaming and hashing it:
    the sha256 is verified once per host, at the network boundary, and the directory must be
    private (owned by this user, no group/other write), as the processes' own memory is.
    Readers still check the header against their template and the file's size, and map the
    file copy-on-write (their arrays are writable and private, and cost no copy: the 16 actors
    of a host share one copy of the params in memory).
    """

    MAGIC = b"CRLPARAMS\x01\n\x00"         # 12 bytes; then u32 header length, then the header
    ALIGN = 64

    def __init__(self, directory: str):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError(f"params host cache {directory!r}: must be a directory owned by "
                             "this user and not writable by group or others")
        self.directory = directory
        self.stores_failed = 0

    def key(self, address: str, subset: Tuple[str, ...], wire_dtype: str, signature: str) -> str:
        ident = json.dumps([PROTOCOL_VERSION, address, list(subset), wire_dtype, signature])
        return hashlib.sha256(ident.encode()).hexdigest()[:40]

    def _path(self, key: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{key}.{suffix}")

    def try_lock(self, key: str) -> Optional[int]:
        import fcntl
        fd = os.open(self._path(key, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        os.close(fd)                       # closing releases the flock

    def load(self, key: str, min_version: int):
        """(header, payload) of the entry if its version >= min_version and the file is whole;
        else None."""
        import mmap
        import struct
        try:
            f = open(self._path(key, "params"), "rb")
        except FileNotFoundError:
            return None
        with f:
            try:
                pre = f.read(len(self.MAGIC) + 4)
                if len(pre) != len(self.MAGIC) + 4 or not pre.startswith(self.MAGIC):
                    return None
                (n,) = struct.unpack("<I", pre[len(self.MAGIC):])
                h = params_pb2.ParamsHeader.FromString(f.read(n))
                if h.not_modified or h.version < min_version:
                    return None
                start = self._payload_offset(n)
                size = os.fstat(f.fileno()).st_size
                if size != start + h.total_bytes:
                    return None
                # Copy-on-write: no copy and no new memory until the caller writes to an array;
                # writes stay private to this process. The entry is never changed in place
                # (a new version is a new file renamed over it), so the mapping stays valid.
                m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, DecodeError, struct.error):
                return None
        return h, np.frombuffer(m, np.uint8, count=h.total_bytes, offset=start)

    def _payload_offset(self, header_len: int) -> int:
        n = len(self.MAGIC) + 4 + header_len
        return -(-n // self.ALIGN) * self.ALIGN

    def store(self, key: str, header: params_pb2.ParamsHeader, buf: np.ndarray) -> bool:
        """Writes the entry (caller holds the lock). A failure (e.g. a full /dev/shm) is logged
        and leaves the previous entry; readers then fetch over the network."""
        import glob
        import logging
        import struct
        final = self._path(key, "params")
        for stale in glob.glob(glob.escape(final) + ".tmp.*"):   # from writers that died
            try:
                os.unlink(stale)
            except OSError:
                pass
        tmp = f"{final}.tmp.{os.getpid()}"
        raw = header.SerializeToString()
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(self.MAGIC + struct.pack("<I", len(raw)) + raw)
                f.write(b"\x00" * (self._payload_offset(len(raw)) - f.tell()))
                f.write(memoryview(buf))
            os.replace(tmp, final)
            return True
        except OSError as e:
            self.stores_failed += 1
            logging.getLogger(__name__).warning(
                "params host cache %s: cannot store version %d (%s); fetching over the network",
                self.directory, header.version, e.strerror or e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
