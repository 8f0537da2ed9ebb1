"""Open images: requests meet I/O here (docs/design.md, "Layers").

An :class:`~cachefs.image.base.Image` owns one image file: its lock, its
descriptors per cache mode, the flush protocol and the counters; the qcow2
half drives the sans-I/O core (cachefs/qcow2/) on the backends
(cachefs/backend/). Nothing here knows about FUSE or the C data plane; the
data plane reaches an image only through its hooks (``hooks.py``).
"""
