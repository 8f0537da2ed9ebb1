"""The commands: ``cachefs`` (main.py) and mount.fuse.cachefs / umount.fuse.cachefs (mount_helper.py).

Nothing below imports this package. User errors are one line on stderr.
"""
