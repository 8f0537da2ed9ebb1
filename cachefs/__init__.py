"""cachefs: guest disk images (qcow2 or raw) served as plain raw files over FUSE."""

__version__ = "0.1.0"
