"""Giving memory back to the OS while a model loads and once the server is up, and keeping a
step's large blocks in the heap while it serves (`serve_from_heap`).

Three kinds of pages stay resident after start-up or a load without being used again:
- freed heap pages, which glibc keeps for later allocations (`return_freed_memory`);
- pages of the shared libraries' code and read-only data that only importing or loading touched:
  libtorch's static initializers register thousands of operators, touching ~60 MiB of its 400 MiB
  of code, and making the weights runs ~25 MiB more, little of which a step runs again
  (`release_library_pages`);
- pages of a mapped checkpoint whose tensors have been read and copied (`drop_mapped_pages`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc

MADV_DONTNEED = 4  # unmap these pages from this process (a file mapping's come back from the file when touched)
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (file pages are re-read when touched again)
PAGE_BYTES = 4096  # the kernel's page on the CPUs served; madvise takes page-aligned starts


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS, which glibc keeps otherwise: after the weights load, the
    float32 staging copies (~160 MB of resident memory on the default model); once the server's
    engine is up, whatever else loading freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def read_only_file_mappings(smaps: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, path, copied) of each mapping of a file that is not writable, from
    /proc/<pid>/smaps text; `copied` if some of its pages are private copies (Anonymous above 0):
    a library's relocated constants, written before they were made read-only. The others' pages
    are clean copies of the file: dropping them loses nothing, a later touch reads them again.
    Writable private mappings (relocated data) are left out: their pages may differ from the file."""
    found = []
    current = None  # the read-only file mapping whose fields follow, as a list to complete
    for line in smaps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's first line
            current = None
            if len(fields) == 6 and fields[5].startswith("/") and "w" not in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = [start, end, fields[5], True]  # copies assumed until its Anonymous field says not
                found.append(current)
        elif current is not None and fields and fields[0] == "Anonymous:":
            current[3] = int(fields[1]) > 0
    return [tuple(mapping) for mapping in found]


def release_library_pages() -> int:
    """Take the resident pages of this process's read-only file mappings (shared libraries' code
    and constants) out of its resident set. The ones the server still uses come back on their
    next touch (~20 MiB of ~100 on the default model); the rest were needed only to start or to
    load. Clean pages are unmapped (MADV_DONTNEED: they stay in the page cache, so a later touch
    costs a minor fault, not a read of the file); a mapping holding private copies (relocated
    constants) is reclaimed instead (MADV_PAGEOUT), which keeps what was written, and pages another
    process maps too are left to it. Returns how far the resident set fell, in bytes: 0 where the
    platform cannot (not Linux)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    try:
        with open("/proc/self/smaps") as f:
            mappings = read_only_file_mappings(f.read())
        before = resident_bytes()
    except OSError:
        return 0
    for start, end, _path, copied in mappings:
        # Fails (EINVAL) on kernels without MADV_PAGEOUT (5.4+), and for a mapping gone meanwhile: no harm.
        madvise(start, end - start, MADV_PAGEOUT if copied else MADV_DONTNEED)
    return max(0, before - resident_bytes())


def drop_mapped_pages(address: int, length: int) -> None:
    """Take the pages of a read-only file mapping under [address, address + length) out of this
    process's resident set: a loaded checkpoint's tensors once they are read and copied, which
    would otherwise stay resident (and count in the server's peak) until the file is closed. The
    file's contents stay in the page cache; a later read of the range faults them back in. Pages
    the range shares with a neighbour come back the same way when it is read."""
    madvise = _madvise()
    if madvise is None or length <= 0:
        return
    start = address - address % PAGE_BYTES
    madvise(start, address + length - start, MADV_DONTNEED)


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice), typed; None where there is none to call."""
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def resident_bytes() -> int:
    """This process's resident set (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536  # glibc's own limit on blocks mapped apart
MAPPED_APART_BYTES = 1 << 20  # while loading, allocations this large or larger get their own mapping
# Load-time work done a piece at a time keeps each piece's temporaries this small, well under
# MAPPED_APART_BYTES: a temporary above it is mapped and faulted in afresh at every allocation.
LOAD_PIECE_BYTES = MAPPED_APART_BYTES // 4
# While serving, freed memory up to this much stays at the top of each of glibc's heaps for the next step.
SERVING_TRIM_BYTES = 256 << 20


@contextlib.contextmanager
def large_blocks_mapped_apart(threshold: int = MAPPED_APART_BYTES):
    """While loading, every allocation of `threshold` bytes or more gets its own mapping, returned to
    the OS when freed. Loading frees large float32 staging copies between the small ones it keeps;
    with glibc's adaptive threshold (raised to the largest block freed, up to 32 MiB) they land in
    the heap among the kept ones and leave it fragmented. Afterwards, serve_from_heap()."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        serve_from_heap()


def serve_from_heap() -> None:
    """Once a model is loaded: every block comes from the heap, none gets a mapping of its own (so
    the mapping threshold no longer matters), and up to SERVING_TRIM_BYTES freed at a heap's top
    stay there. A step's large temporaries are then the previous step's memory again. A block
    mapped apart is zeroed and faulted in page by page at each allocation: glibc maps apart every
    block above 32 MiB whatever its thresholds, such as the logits of a 151,936-token vocabulary at
    64 rows (39 MB of float32) and the sampler's copies of them (a 64-row step on the Qwen2-0.5B-
    shaped Q8_0 file at temperature 0.7: 162-173 ms with ~28,000 page faults against 116-127 ms;
    bench/RESULTS.md, thirty-sixth sitting). Memory freed in the middle of a heap stays until
    return_freed_memory()."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_BYTES)


def settle_after_load() -> int:
    """After a model is loaded: collect once, then put every object alive now (the model's modules,
    its tokenizer) out of the garbage collector's reach (with the default model a full collection
    walks ~370,000 such objects in ~0.2 s, a stall of the engine thread and, through the GIL, of
    every stream); hand the heap pages loading freed back to the OS; then the library pages only
    start-up and loading touched. The bytes of those pages released."""
    gc.collect()
    gc.freeze()
    return_freed_memory()
    return release_library_pages()
