"""The filesystem the kernel sees: pyfuse3 handlers, the image directory, the mount's life.

``operations.py`` answers FUSE requests (the one place errors become
errnos); ``direct_requests.py`` answers those the data plane hands to
Python directly; ``catalog.py`` is the image directory; ``daemon.py`` runs a
mount from check to unmount.
"""
