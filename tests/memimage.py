"""A synchronous driver of the qcow2 engine over a bytearray: the core's test bench.

It carries out plans exactly as the image layer does (data writes, commit,
flush batches with syncs), but in memory, so thousands of random operations
run in seconds and the engine's decisions can be checked without a mount.
"""

from __future__ import annotations

from cachefs.qcow2.create import new_image
from cachefs.qcow2.engine import Engine, open_engine
from cachefs.qcow2.plan import ExtentKind, run_sync


class MemImage:
    def __init__(self, buf: bytearray, *, writable: bool = True, cache_bytes: int = 1 << 20):
        self.buf = buf
        self.syncs = 0
        self.events: list = []  # ("write", offset, bytes) | ("sync",)
        self.engine: Engine = run_sync(open_engine(len(buf), writable=writable, cache_bytes=cache_bytes),
                                       self.pread)

    @classmethod
    def create(cls, size: int, **kw) -> "MemImage":
        cache = kw.pop("cache_bytes", 1 << 20)
        buf = bytearray()
        for off, data in new_image(size, **kw):
            cls._put(buf, off, data)
        return cls(buf, cache_bytes=cache)

    @staticmethod
    def _put(buf: bytearray, off: int, data) -> None:
        if len(buf) < off + len(data):
            buf.extend(bytes(off + len(data) - len(buf)))
        buf[off:off + len(data)] = data

    def pread(self, off: int, length: int) -> bytes:
        return bytes(self.buf[off:off + length])

    def pwrite(self, off: int, data) -> None:
        self.events.append(("write", off, bytes(data)))
        self._put(self.buf, off, data)

    def read(self, off: int, length: int) -> bytes:
        out = bytearray()
        for ext in run_sync(self.engine.plan_read(off, length), self.pread):
            if ext.kind is ExtentKind.ZERO:
                out += bytes(ext.length)
            elif ext.kind is ExtentKind.DATA:
                out += self.pread(ext.host_offset, ext.length).ljust(ext.length, b"\0")
            elif ext.kind is ExtentKind.COMPRESSED:
                desc = ext.compressed
                whole = self.engine.decompress(desc, self.pread(desc.offset, desc.max_length))
                out += whole[ext.in_cluster:ext.in_cluster + ext.length]
            else:
                raise OSError(5, "damaged metadata")
        return bytes(out)

    def write(self, off: int, data) -> None:
        plan = run_sync(self.engine.plan_write(off, data), self.pread)
        for w in plan.data_writes:
            self.pwrite(w.host_offset, w.data)
        if plan.data_writes:
            self.engine.data_written()
        run_sync(self.engine.commit(plan), self.pread)
        if self.engine.cache.over_budget:  # as Qcow2Image._writeout_early: no sync
            batch = self.engine.writeout_batch()
            for item, off, payload in batch:
                if payload:
                    self.pwrite(off, payload)
            self.engine.written(batch)
            self.engine.cache.trim()

    def resize(self, size: int) -> None:
        run_sync(self.engine.resize(size), self.pread)

    def flush(self) -> int:
        """Reserve ahead, write out everything, syncing between dependent batches. Returns syncs used."""
        run_sync(self.engine.prepare_flush(), self.pread)
        if len(self.buf) < self.engine.min_file_size:
            self._put(self.buf, len(self.buf), bytes(self.engine.min_file_size - len(self.buf)))
        used = 0
        while self.engine.dirty:
            batch = self.engine.writeout_batch()
            for item, off, payload in batch:
                if payload:
                    self.pwrite(off, payload)
            self.engine.written(batch)
            self.events.append(("sync",))
            used += 1
            run_sync(self.engine.synced(), self.pread)
            if used > 64:
                raise AssertionError("flush does not converge")
        self.syncs += used
        return used

    def close(self) -> int:
        """A clean close: give the reservation back, then write everything out."""
        run_sync(self.engine.release_reservation(), self.pread)
        if len(self.buf) > self.engine.allocated_end:
            del self.buf[self.engine.allocated_end:]
        used = 0
        for _ in range(8):
            used += self.flush_no_reserve()
            if not self.engine.dirty:
                break
        return used

    def flush_no_reserve(self) -> int:
        saved, self.engine._allocs_since_flush = self.engine._allocs_since_flush, 0
        try:
            return self.flush()
        finally:
            self.engine._allocs_since_flush = saved
