"""The mount lifecycle: discover images, daemonize, serve, flush, unmount.

`cachefs mount` returns only once the mount is live (a readiness pipe from the
daemon), so a script can use the files on its next line. SIGTERM, SIGINT and
`cachefs umount` flush every image *while still serving* (a client blocked in
a request is not stranded), then stop the FUSE loop, close the images and
unmount. An image that cannot be opened is left out with a warning in the
log and in `cachefs stats`; the rest are served.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import attrs

from cachefs.errors import CachefsError
from cachefs.fuseconn import raise_queue_limit

log = logging.getLogger("cachefs.daemon")

IMAGE_SUFFIXES = (".qcow2", ".raw", ".img")
#: pyfuse3 request tasks, and the FUSE background-request limit set to match
#: (cachefs/fuseconn.py): enough for a QD32 client on two images at once.
MAX_TASKS = 64


@attrs.frozen
class MountConfig:
    image_dir: str
    mountpoint: str
    cache_mode: str = "writeback"
    aio: str = "threads"
    read_only: bool = False
    allow_other: bool = False
    # Implied by allow_other: the kernel checks every opener against the modes shown.
    default_permissions: bool = False
    # sshfs's -o uid=,gid=,umask=: override what stat shows (None: the image file's own).
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    # What create(2) through the mount makes of NAME.raw: a qcow2 image (NAME.qcow2) or a raw file.
    create_format: str = "qcow2"
    pid_file: str | None = None
    log_file: str | None = None
    foreground: bool = False
    debug: bool = False


def discover_images(image_dir: str) -> dict[str, str]:
    """Guest-visible name -> image path. NAME.qcow2 shows as NAME.raw; raw images keep their name."""
    out: dict[str, str] = {}
    for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.name.endswith(IMAGE_SUFFIXES):
            continue
        if not entry.is_file(follow_symlinks=True):
            continue
        visible = entry.name[:-len(".qcow2")] + ".raw" if entry.name.endswith(".qcow2") else entry.name
        if visible in out:
            raise CachefsError(f"{os.path.basename(out[visible])} and {entry.name} would both appear "
                               f"as {visible}; rename one of them")
        out[visible] = entry.path
    return out


def _setup_logging(cfg: MountConfig) -> str:
    level = logging.DEBUG if cfg.debug else logging.INFO
    if cfg.foreground and not cfg.log_file:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return "stderr"
    path = cfg.log_file
    if path is None:
        run = "/run/cachefs" if os.geteuid() == 0 else os.path.expanduser("~/.cache/cachefs")
        os.makedirs(run, exist_ok=True)
        path = os.path.join(run, cfg.mountpoint.strip("/").replace("/", "_") + ".log")
    logging.basicConfig(filename=path, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return path


def run_mount(cfg: MountConfig) -> int:
    """Serve in the foreground, or fork and return once the daemon says it is live."""
    if cfg.foreground:
        _setup_logging(cfg)
        return _serve(cfg, ready=lambda msg: print(msg, file=sys.stderr) if msg != "ok" else None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        where = _setup_logging(cfg)
        log.info("cachefs daemon %d serving %s at %s (log %s)", os.getpid(), cfg.image_dir, cfg.mountpoint, where)
        told = False

        def ready(msg: str) -> None:
            nonlocal told
            if not told:
                os.write(wfd, msg.encode() + b"\n")
                os.close(wfd)
                told = True
        try:
            code = _serve(cfg, ready)
        except CachefsError as exc:  # a user error (e.g. no O_DIRECT here): one line, no traceback
            log.error("not mounting: %s", exc)
            ready(f"error: {exc}")
            code = 1
        except BaseException as exc:  # the parent must hear about it, whatever it is
            log.exception("daemon failed")
            ready(f"error: {exc}")
            code = 1
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd) as pipe:
        msg = pipe.readline().strip()
    if msg == "ok":
        return 0
    print(f"cachefs: {msg.removeprefix('error: ') or 'the daemon exited before mounting'}", file=sys.stderr)
    return 1


def _serve(cfg: MountConfig, ready) -> int:
    import trio
    return trio.run(_serve_async, cfg, ready)


async def _serve_async(cfg: MountConfig, ready) -> int:
    import pyfuse3
    import trio

    from cachefs.backend import EngineUnavailable
    from cachefs.errors import DirectIOUnsupported
    from cachefs.fs import CachefsOperations
    from cachefs.image import open_image
    from cachefs.policy import mode_named

    mode = mode_named(cfg.cache_mode)
    images, skipped = {}, {}
    try:
        for name, path in discover_images(cfg.image_dir).items():
            try:
                images[name] = await open_image(path, writable=not cfg.read_only, mode=mode, aio=cfg.aio)
            except (DirectIOUnsupported, EngineUnavailable):
                raise  # the whole directory is on that filesystem / this host: refuse, no fallback
            except (CachefsError, OSError) as exc:
                skipped[name] = str(exc)
                log.warning("not serving %s: %s", path, exc)
    except BaseException:
        for img in images.values():
            await img.close()
        raise
    ops = CachefsOperations(images, skipped=skipped, read_only=cfg.read_only)
    options = set(pyfuse3.default_options) | {"fsname=cachefs", "subtype=cachefs"}
    if cfg.allow_other:
        options.add("allow_other")
    if cfg.read_only:
        options.add("ro")
    try:
        pyfuse3.init(ops, cfg.mountpoint, options)
    except BaseException:
        await ops.close_all()
        raise
    for name, why in skipped.items():
        ready_note = f"warning: {name} not served: {why}"
        log.warning(ready_note)
    try:
        # FUSE's default of 12 background requests would cap a QD32 client.
        log.info("%s", raise_queue_limit(cfg.mountpoint, MAX_TASKS))
    except OSError as exc:
        log.warning("FUSE queue limit left at the kernel default: %s", exc)
    ready("ok")
    log.info("serving %d image(s): %s", len(images), ", ".join(images) or "none")

    async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for sig in signals:
                log.info("signal %d: flushing and unmounting", sig)
                for img in images.values():
                    try:
                        if img.writable:
                            await img.flush()
                    except (CachefsError, OSError) as exc:
                        log.error("flush of %s failed: %s", img.path, exc)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(on_signal)
        await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()
    problems = await ops.close_all()
    try:
        pyfuse3.close(unmount=True)
    except Exception as exc:  # already unmounted from outside (fusermount3 -u)
        log.info("unmount: %s", exc)
    log.info("unmounted %s%s", cfg.mountpoint, f" with {len(problems)} problem(s)" if problems else " cleanly")
    return 1 if problems else 0
