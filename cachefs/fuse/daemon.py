"""The mount lifecycle: check, daemonize, serve, flush, unmount.

`cachefs mount` returns only once the mount is live (a readiness pipe from the
daemon), so a script can use the files on its next line; it prints the log's
path and one line per image it leaves out, and refuses a mountpoint that is
already a mount. Under systemd (``Type=notify``, ``--foreground``) readiness
is ``READY=1`` on $NOTIFY_SOCKET instead.

Two ways down:

- ``cachefs umount``, ``umount`` (through umount.fuse.cachefs, which waits
  for the daemon), ``fusermount3 -u`` or SIGTERM (systemd's stop) unmount the
  way umount(8) does: the kernel refuses while a file in the mount is open,
  so nothing a running QEMU holds is cut off, and a refused SIGTERM leaves
  the daemon serving (one line in the log says why). Once unmounted, the
  kernel ends the FUSE connection, the request loop returns, and every image
  is flushed and closed.
- SIGINT (Ctrl-C) is the admin's "stop now": every image is flushed *while
  still serving* (a client blocked in a request is not stranded), the open
  handles are logged, and the mount is detached.

With the data plane on (the default when the native module has it; docs/design.md
"Two planes"), the daemon mounts ``/dev/fuse`` itself (cachefs/fuse/kernel_mount.py), a
C thread serves it (cachefs/dataplane/plane.py), and pyfuse3 is initialised on one end
of a socketpair, ``/dev/fd/M``, so libfuse mounts and unmounts nothing. Both ways
down are the same from outside; inside, the C thread stops first (it has drained
its fast requests), then pyfuse3's loop, and a SIGINT detaches the mount here.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

import attrs

from cachefs.fuse import utab
from cachefs.fuse.catalog import clash_message, scan
from cachefs.errors import CachefsError
from cachefs.fuse.queue_limit import raise_queue_limit
from cachefs.mountinfo import mount_at

log = logging.getLogger("cachefs.fuse.daemon")

#: pyfuse3 request tasks, and the FUSE background-request limit set to match
#: (cachefs/fuse/queue_limit.py): enough for a QD32 client on two images at once.
MAX_TASKS = 64
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@attrs.frozen
class MountConfig:
    image_dir: str
    mountpoint: str
    cache_mode: str = "writeback"
    aio: str = "threads"
    read_only: bool = False
    # Why the mount is read-only although -o ro was not given (an image directory on a read-only filesystem).
    read_only_why: str | None = None
    allow_other: bool = False
    # Implied by allow_other: the kernel checks every opener against the modes shown.
    default_permissions: bool = False
    # sshfs's -o uid=,gid=,umask=: override what stat shows (None: the image file's own).
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    # What create(2) through the mount makes of NAME.raw: a qcow2 image (NAME.qcow2) or a raw file.
    create_format: str = "qcow2"
    # "on", "off", or None: on when the native module has the data plane, else off (said in one line).
    dataplane: str | None = None
    # "on", "off", or None (off): "on" passes raw images through where the kernel offers it (issue 24;
    # dataplane/passthrough.py). Not the default yet: the kernel writes past a raw disk's end itself,
    # growing the file, where a disk must answer ENOSPC (docs/design.md, "Kernel passthrough").
    passthrough: str | None = None
    # "auto" (None), "uring" or "dev": how the data plane takes requests (dataplane/transport.py).
    transport: str | None = None
    l2_cache_size: int | None = None  # bytes; None: the engine's default
    pid_file: str | None = None
    log_file: str | None = None
    foreground: bool = False
    debug: bool = False
    # -o growable: a write past a disk's end grows it; otherwise ENOSPC (only a resize changes the size).
    growable: bool = False
    backing_dirs: tuple[str, ...] = ()  # --backing-dir: where else backing files may be (image/backing_names.py)
    # -o drop_bitmaps: an image with persistent bitmaps is served writable, its bitmaps deleted.
    drop_bitmaps: bool = False
    # -o noexec (mount(8) adds it for fstab's `user`): the kernel's flag on the FUSE mount.
    noexec: bool = False


def discover_images(image_dir: str) -> dict[str, str]:
    """Guest-visible name -> image path; two images that would share a name refuse the mount."""
    found, _ = scan(image_dir)
    for group in found.values():
        if len(group) > 1:
            raise CachefsError(clash_message(group))
    return {name: group[0].path for name, group in found.items()}


def refuse_if_mounted(mountpoint: str) -> None:
    """One mount per mountpoint: stacking a second one hides the first, and umount would hit the wrong one."""
    m = mount_at(mountpoint)
    if m is not None:
        raise CachefsError(f"{mountpoint} is already a mount point ({m.fstype} of {m.source}); "
                           f"unmount it first")


def log_path(cfg: MountConfig) -> str | None:
    """Where the daemon logs: --log, else /run/cachefs/MOUNTPOINT.log; None for stderr (foreground)."""
    if cfg.log_file or not cfg.foreground:
        if cfg.log_file:
            return os.path.abspath(cfg.log_file)
        run = "/run/cachefs" if os.geteuid() == 0 else os.path.expanduser("~/.cache/cachefs")
        os.makedirs(run, exist_ok=True)  # ours to make; the directory of a --log is the admin's
        return os.path.join(run, cfg.mountpoint.strip("/").replace("/", "_") + ".log")
    return None


def _open_log(path: str | None):
    """Open the log before anything starts, so that a bad path fails the mount with its reason."""
    if path is None:
        return sys.stderr
    try:
        return open(path, "a", buffering=1)
    except OSError as exc:
        raise CachefsError(f"cannot open the log {path}: {exc.strerror}") from None


def _setup_logging(cfg: MountConfig, stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)


def run_mount(cfg: MountConfig) -> int:
    """Serve in the foreground, or fork and return once the daemon says it is live."""
    refuse_if_mounted(cfg.mountpoint)
    where = log_path(cfg)
    stream = _open_log(where)
    if cfg.foreground:
        _setup_logging(cfg, stream)
        return _serve(cfg, _foreground_ready(where), where)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os._exit(_daemon(cfg, stream, where, wfd))
    os.close(wfd)
    stream.close()
    return _await_ready(rfd, where)


def _daemon(cfg: MountConfig, stream, where: str, wfd: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _setup_logging(cfg, stream)
    log.info("cachefs daemon %d serving %s at %s (log %s)", os.getpid(), cfg.image_dir, cfg.mountpoint, where)
    pipe = os.fdopen(wfd, "w", buffering=1)

    def tell(msg: str) -> None:
        if not pipe.closed:
            pipe.write(msg + "\n")
            if msg == "ok" or msg.startswith("error: "):
                pipe.close()
    try:
        code = _serve(cfg, tell, where)
    except CachefsError as exc:  # a user error (e.g. no O_DIRECT here): one line, no traceback
        log.error("not mounting: %s", exc)
        tell(f"error: {exc}")
        code = 1
    except BaseException as exc:  # the parent must hear about it, whatever it is
        log.exception("daemon failed")
        tell(f"error: {exc}")
        code = 1
    logging.shutdown()
    return code


def _await_ready(rfd: int, where: str) -> int:
    """Relay the daemon's warnings to stderr until it says ok (0) or error (1)."""
    with os.fdopen(rfd) as pipe:
        for line in pipe:
            line = line.rstrip("\n")
            if line == "ok":
                print(f"cachefs: log: {where}", file=sys.stderr)
                return 0
            if line.startswith("error: "):
                print(f"cachefs: {line.removeprefix('error: ')}", file=sys.stderr)
                return 1
            print(f"cachefs: {line}", file=sys.stderr)
    print(f"cachefs: the daemon exited before mounting; see {where}", file=sys.stderr)
    return 1


def _foreground_ready(where: str | None):
    def tell(msg: str) -> None:
        if msg == "ok":
            sd_notify("READY=1")
            if where:
                print(f"cachefs: log: {where}", file=sys.stderr)
        else:
            print(f"cachefs: {msg.removeprefix('error: ')}", file=sys.stderr)
    return tell


def sd_notify(state: str) -> None:
    """systemd's readiness protocol (sd_notify(3)): one datagram to $NOTIFY_SOCKET, if there is one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as exc:
        log.warning("sd_notify(%s) to %s: %s", state, addr, exc)


def _write_pid_file(path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)  # systemd reads it as soon as the parent exits: never half-written
    except OSError as exc:
        raise CachefsError(f"cannot write the pid file {path}: {exc.strerror}") from None


def _serve(cfg: MountConfig, tell, where: str | None) -> int:
    import trio
    written = False
    try:
        if cfg.pid_file:  # before mounting: a pid file that cannot be written leaves no mount behind
            _write_pid_file(cfg.pid_file)
            written = True
        return trio.run(_serve_async, cfg, tell, where)
    finally:
        if written:
            try:
                os.unlink(cfg.pid_file)
            except FileNotFoundError:
                pass


def _fsname(cfg: MountConfig) -> str:
    # The source column of findmnt/df/mount names the image directory, as sshfs names its remote.
    return cfg.image_dir if "," not in cfg.image_dir else "cachefs"


def _fuse_options(cfg: MountConfig) -> set[str]:
    import pyfuse3
    options = set(pyfuse3.default_options) | {f"fsname={_fsname(cfg)}", "subtype=cachefs"}
    if cfg.allow_other:
        options.add("allow_other")
    if cfg.allow_other or cfg.default_permissions:
        # Other users get in only as the files' modes say: the kernel checks them.
        options.add("default_permissions")
    if cfg.read_only:
        options.add("ro")
    if cfg.noexec:
        options.add("noexec")
    return options


def _read_only_info(cfg: MountConfig) -> dict[str, str]:
    """The root's user.cachefs.read_only (and `cachefs stats`): why the whole mount is read-only."""
    if not cfg.read_only:
        return {}
    return {"read_only": cfg.read_only_why or "mounted with -o ro"}


async def _open_catalog(cfg: MountConfig):
    from cachefs.backend import SubmitterUnavailable
    from cachefs.fuse.catalog import Catalog
    from cachefs.errors import DirectIOUnsupported
    from cachefs.image.backing import Bases
    from cachefs.image.backing_names import open_checked
    from cachefs.image.opening import open_image
    from cachefs.policy import mode_named

    mode = mode_named(cfg.cache_mode)

    async def opener(path: str):
        return await open_image(path, writable=not cfg.read_only, mode=mode, aio=cfg.aio,
                                cache_bytes=cfg.l2_cache_size, drop_bitmaps=cfg.drop_bitmaps, bases=bases)

    async def base_opener(bf, walk):  # a base the mount does not serve: read-only, shared
        fd = open_checked(bf, os.O_RDONLY)  # the very file the name's rule accepted
        return await open_image(bf.path, writable=False, mode=mode, aio=cfg.aio, fd=fd,
                                cache_bytes=cfg.l2_cache_size, bases=bases, walk=walk)
    catalog = Catalog(cfg.image_dir, opener)
    bases = catalog.bases = Bases([cfg.image_dir, *cfg.backing_dirs], base_opener, catalog.served_for_backing)
    try:
        # The whole directory is on that filesystem / this host: refuse, no fallback.
        await catalog.refresh(force=True, fatal=(DirectIOUnsupported, SubmitterUnavailable))
    except BaseException:
        await catalog.close_all()
        raise
    return catalog


def _new_dataplane(cfg: MountConfig, tell):
    """--dataplane on/off as asked; by default on when the module has it, else off, said in one line.

    The C side is created before anything is mounted: when io_uring is refused
    (or `on` was asked for without the module), the mount is refused in one line.
    """
    from cachefs.dataplane import transport
    from cachefs.dataplane.plane import DataPlane, why_unavailable
    if cfg.dataplane == "off":
        if cfg.transport == "uring":
            raise CachefsError("--transport uring needs the data plane (--dataplane on)")
        return None
    why = why_unavailable()
    if why is not None and cfg.dataplane is None and cfg.transport != "uring":
        tell(f"warning: data plane off: {why}")
        return None
    return DataPlane(max_background=MAX_TASKS, passthrough=cfg.passthrough != "off",
                     transport=transport.decide(cfg.transport))


@attrs.define
class _OwnMount:
    """The data plane's mount: /dev/fuse mounted here, and the C thread that serves it."""
    plane: object  # cachefs.dataplane.plane.DataPlane
    fuse_fd: int
    mountpoint: str

    def close(self, *, detach: bool) -> None:
        """Detach the mount after a signal (libfuse will not: it did not mount it), then free the plane."""
        from cachefs.fuse.kernel_mount import detach as detach_mount
        if self.fuse_fd >= 0:
            if detach:
                detach_mount(self.mountpoint, self.fuse_fd)
            else:
                os.close(self.fuse_fd)
            self.fuse_fd = -1
        self.plane.close()


def _mount_dataplane(cfg: MountConfig, ops, plane) -> _OwnMount:
    """mount(2) here, pyfuse3 on its end of the socketpair, then the C thread on /dev/fuse."""
    import pyfuse3

    from cachefs.fuse import kernel_mount
    try:
        fd = kernel_mount.mount(cfg.mountpoint, fsname=_fsname(cfg), options=_fuse_options(cfg))
    except BaseException:
        plane.close()
        raise
    own = _OwnMount(plane, fd, cfg.mountpoint)
    try:
        pyfuse3.init(ops, f"/dev/fd/{plane.libfuse_fd}", _fuse_options(cfg))
        plane.start(fd)
    except BaseException:
        own.close(detach=True)
        raise
    return own


async def _serve_async(cfg: MountConfig, tell, where: str | None) -> int:
    import pyfuse3

    from cachefs.dataplane.handles import FastPaths
    from cachefs.fuse.operations import CachefsOperations, Presentation

    catalog = await _open_catalog(cfg)
    own = None
    try:
        plane = _new_dataplane(cfg, tell)
        ops = CachefsOperations(
            catalog, show=Presentation(cfg.uid, cfg.gid, cfg.umask, cfg.read_only),
            create_qcow2=cfg.create_format == "qcow2", growable=cfg.growable,
            root_info={"log": where or "stderr", "image_dir": cfg.image_dir, **_read_only_info(cfg)},
            fast=plane and FastPaths(plane, read_only=cfg.read_only, served_inode=catalog.inode_of))
        if plane is not None:
            own = _mount_dataplane(cfg, ops, plane)
        else:
            pyfuse3.init(ops, cfg.mountpoint, _fuse_options(cfg))
    except BaseException:
        await catalog.close_all()
        raise
    _warn_read_only(cfg, tell, where)
    for name, why in catalog.skipped.items():
        tell(f"warning: not serving {why}")
    for e in catalog.by_name.values():  # not the snapshots' files: read-only is what they are
        if e.image.read_only_reason and not cfg.read_only:
            tell(f"warning: serving {e.image.path} read-only: {e.image.read_only_reason}")
    if own is None:
        try:
            # FUSE's default of 12 background requests would cap a QD32 client.
            # (The data plane sets it in the INIT reply instead.)
            log.info("%s", raise_queue_limit(cfg.mountpoint, MAX_TASKS))
        except OSError as exc:
            log.warning("FUSE queue limit left at the kernel default: %s", exc)
    ours = _claim(cfg.mountpoint)
    tell("ok")
    log.info("serving %d image(s): %s (data plane %s)", len(catalog.by_name),
             ", ".join(catalog.names()) or "none", "on" if own else "off")
    if own is None:
        log.warning("data plane off: fallocate (discard, write-zeroes) fails with EOPNOTSUPP and "
                    "SEEK_DATA/SEEK_HOLE see the whole file as data; pyfuse3 serves neither, the data plane does")
    stopped = await _run_until_unmounted(ops, own and own.plane, ours)
    sd_notify("STOPPING=1")
    problems = await _shut_down(catalog, own, stopped)
    _forget(ours)
    log.info("unmounted %s%s", cfg.mountpoint, f" with {len(problems)} problem(s)" if problems else " cleanly")
    return 1 if problems else 0


def _warn_read_only(cfg: MountConfig, tell, where: str | None) -> None:
    """An image directory on a read-only filesystem: the mount is read-only, said once (stderr and the log)."""
    if cfg.read_only_why:
        tell(f"warning: {cfg.read_only_why}")
        if where:  # without a log file the log is stderr, where tell has just said it
            log.warning("%s", cfg.read_only_why)


def _claim(mountpoint: str):
    """Our mount's mountinfo entry (SIGTERM unmounts that one), and umount(8) told to wait for us (fuse/utab.py)."""
    ours = mount_at(mountpoint)
    if ours is not None:
        utab.register(ours.source, mountpoint)
    return ours


def _forget(ours) -> None:
    """Once our mount is gone, so is its utab entry (a stale one would send the next mount's umount to us)."""
    if ours is None:
        return
    now = mount_at(ours.path)
    if now is None or now.mount_id != ours.mount_id:
        utab.unregister(ours.path)


async def _shut_down(catalog, own: _OwnMount | None, stopped: bool) -> list[str]:
    """Flush and close every image, then let go of the mount; the images' problems, one line each."""
    import pyfuse3
    # Serving is over: only the final flush (and after SIGINT the detach) is left, and a SIGTERM (systemd's,
    # after its ExecStop) must not cut it short. SIGKILL still does, losing what was not yet written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if own is not None:
        await own.plane.finish()  # pyfuse3's loop has returned: nothing more to relay
    problems = await catalog.close_all()
    try:
        # After a signal the mount is still there: detach it. After an
        # unmount from outside it is gone already (and nothing else may be
        # unmounted in its place).
        pyfuse3.close(unmount=stopped and own is None)
    except Exception as exc:
        log.info("unmount: %s", exc)
    if own is not None:
        try:
            own.close(detach=stopped)
        except OSError as exc:
            log.info("unmount: %s", exc)
    return problems


async def _run_until_unmounted(ops, plane=None, ours=None) -> bool:
    """Serve until the kernel ends the connection (False) or SIGINT stops us (True).

    SIGTERM unmounts ``ours`` as umount(8) would; while the mount is busy that
    is refused, and serving goes on (_unmount_unless_busy).

    With the data plane, the kernel's end is seen by the C thread (``plane.serve``
    then ends pyfuse3's loop), and a signal stops the C thread's reading before
    pyfuse3's loop: its fast requests in flight are answered first.
    """
    import pyfuse3
    import trio

    from cachefs.fuse.operations import flush_images
    stopped = False

    async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for sig in signals:
                if sig == signal.SIGTERM and ours is not None:
                    if await _unmount_unless_busy(ops, ours):
                        return  # the kernel ends the connection, as after an unmount from outside
                    continue
                log.info("signal %d: flushing and detaching", sig)
                for line in ops.open_handles():
                    log.warning("open at stop: %s", line)
                await flush_images(ops.catalog.images())
                stopped = True
                if plane is not None:
                    await plane.stop()
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_signal)
        if plane is not None:
            from cachefs.fuse.direct_requests import DirectRequests
            nursery.start_soon(plane.serve, pyfuse3.terminate)
            nursery.start_soon(DirectRequests(plane, ops).serve)  # fallocate and lseek (pyfuse3 has neither)
            nursery.start_soon(ops.fast.serve_allocations)  # lent clusters for C's allocating writes
            nursery.start_soon(ops.fast.serve_syncs)  # write-through writes C parked for a sync
        await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()
    return stopped


async def _unmount_unless_busy(ops, ours) -> bool:
    """SIGTERM: unmount as umount(8) does; True once unmounted.

    While a file in the mount is open (a VM's disk) the kernel refuses, and so
    does this: the mount keeps serving, and one line says why, in the log and
    in systemd's STATUS=. systemd sends SIGTERM after ExecStop whatever that
    returned, so this is what keeps `systemctl stop` from pulling disks away.
    """
    import trio

    from cachefs.fuse.kernel_mount import unmount_path
    from cachefs.mountinfo import busy_detail
    mnt = ours.path
    now = mount_at(mnt)
    if now is None or now.mount_id != ours.mount_id:
        why = "it is detached already (umount --lazy): its open files are served until their last close"
    else:
        try:
            await trio.to_thread.run_sync(lambda: unmount_path(mnt, lazy=False))
            log.info("SIGTERM: unmounted %s; flushing every image", mnt)
            return True
        except OSError as exc:
            busy = exc.errno == errno.EBUSY
            why = f"target is busy{await trio.to_thread.run_sync(busy_detail, mnt)}" if busy else exc.strerror
    log.warning("SIGTERM: not unmounting %s: %s; still serving (close them and stop again, or detach with "
                "`cachefs umount --lazy %s`)", mnt, why, mnt)
    for line in ops.open_handles():
        log.warning("open: %s", line)
    sd_notify(f"STATUS=not stopped: {mnt}: {why}")
    return False
