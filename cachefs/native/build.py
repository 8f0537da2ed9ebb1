"""cffi build script (API mode) for ``cachefs.native._cachefs_native``.

It is run at install time through ``setup.py``'s ``cffi_modules``, and can be
run by hand (``python cachefs/native/build.py``) to compile in place.

The module is assembled from *sections*. Each section contributes C
declarations (``cdef``) and the C source that implements or includes them.
Later work (Linux AIO, io_uring) adds a section here and its Python wrapper
in ``__init__.py``; nothing else needs to change.
"""

from __future__ import annotations

import os

from cffi import FFI

MODULE_NAME = "cachefs.native._cachefs_native"

# Each entry: (name, cdef, C source). Order is the order in the module.
SECTIONS: list[tuple[str, str, str]] = []


def section(name: str, cdef: str, source: str = "") -> None:
    SECTIONS.append((name, cdef, source))


# Types the cdef parser does not know; the compiler fills in the real size.
section(
    "types",
    cdef="""
    typedef int... off_t;
    """,
    source="""
    #include <sys/types.h>
    """,
)

# Aligned memory for O_DIRECT: the buffer address must be aligned to the
# logical block size of the device (4096 covers every device we expect).
section(
    "aligned",
    cdef="""
    int posix_memalign(void **memptr, size_t alignment, size_t size);
    void free(void *ptr);
    void *memset(void *s, int c, size_t n);
    """,
    source="""
    #include <stdlib.h>
    #include <string.h>
    """,
)

# posix_fadvise returns an errno value (it does not set errno).
section(
    "fadvise",
    cdef="""
    #define POSIX_FADV_NORMAL ...
    #define POSIX_FADV_RANDOM ...
    #define POSIX_FADV_SEQUENTIAL ...
    #define POSIX_FADV_WILLNEED ...
    #define POSIX_FADV_DONTNEED ...
    #define POSIX_FADV_NOREUSE ...
    int posix_fadvise(int fd, off_t offset, off_t len, int advice);
    """,
    source="""
    #include <fcntl.h>
    """,
)


def make_ffibuilder() -> FFI:
    builder = FFI()
    builder.cdef("\n".join(cdef for _name, cdef, _src in SECTIONS))
    # No feature macros here: cffi includes Python.h first, and its pyconfig.h
    # already defines _GNU_SOURCE and _FILE_OFFSET_BITS=64 (64-bit off_t).
    builder.set_source(
        MODULE_NAME,
        "\n".join(src for _name, _cdef, src in SECTIONS),
        extra_compile_args=["-O2", "-Wall"],
    )
    return builder


ffibuilder = make_ffibuilder()


if __name__ == "__main__":
    # Compile next to the package so `import cachefs.native` finds it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ffibuilder.compile(tmpdir=root, verbose=True)
