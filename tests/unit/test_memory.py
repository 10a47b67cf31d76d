"""Giving start-up-only memory back: which mappings are released, and that releasing them frees
resident memory without changing what the process computes."""

from __future__ import annotations

import json
import subprocess
import sys

from lmserve.memory import read_only_file_mappings

def _smaps(*mappings: tuple[str, int]) -> str:
    """/proc/<pid>/smaps text: each mapping's /proc/<pid>/maps line, then some of its fields."""
    return "".join(f"{line}\nSize:               4 kB\nRss:                4 kB\nAnonymous:   {anon} kB\n"
                   f"VmFlags: rd mr mw me\n" for line, anon in mappings)


SMAPS = _smaps(
    ("55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 123  /usr/bin/python3.11", 4),  # relocated, then read-only
    ("55d0c0a01000-55d0c0c00000 r-xp 00001000 08:01 123  /usr/bin/python3.11", 0),
    ("55d0c0e00000-55d0c0e10000 rw-p 00400000 08:01 123  /usr/bin/python3.11", 64),
    ("55d0c1000000-55d0c5000000 rw-p 00000000 00:00 0    [heap]", 4096),
    ("7f0000000000-7f0004000000 rw-p 00000000 00:00 0", 512),
    ("7f1000000000-7f1010000000 r-xp 00100000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so", 0),
    ("7f1010000000-7f1010100000 r--p 10100000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so", 0),
    ("7f1010100000-7f1010200000 rw-p 10200000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so", 8),
    ("7f2000000000-7f2000001000 r--s 00000000 08:01 789  /tmp/shared with spaces.bin", 0),
    ("7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0    [stack]", 132),
    ("7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0    [vdso]", 0),
)


def test_only_read_only_file_mappings_are_released():
    """Code and constants of files: yes, and those with private copies (relocated constants) so
    marked. Relocated data (rw-p), the heap, anonymous memory, the stack and the vdso: never (their
    pages may exist nowhere else)."""
    found = read_only_file_mappings(SMAPS)
    assert [(hex(start), hex(end), path, copied) for start, end, path, copied in found] == [
        ("0x55d0c0a00000", "0x55d0c0a01000", "/usr/bin/python3.11", True),
        ("0x55d0c0a01000", "0x55d0c0c00000", "/usr/bin/python3.11", False),
        ("0x7f1000000000", "0x7f1010000000", "/venv/lib/torch/lib/libtorch_cpu.so", False),
        ("0x7f1010000000", "0x7f1010100000", "/venv/lib/torch/lib/libtorch_cpu.so", False),
        ("0x7f2000000000", "0x7f2000001000", "/tmp/shared with spaces.bin", False),
    ]
    # Without an Anonymous field, a mapping is taken to hold private copies.
    library = "/venv/lib/torch/lib/libtorch_cpu.so"
    bare = f"7f1000000000-7f1010000000 r-xp 00100000 08:01 456  {library}\n"
    assert read_only_file_mappings(bare) == [(0x7F1000000000, 0x7F1010000000, library, True)]


PROBE = """
import ctypes, json, mmap, os, sys, torch
from lmserve.memory import release_library_pages, resident_bytes

def resident(start):
    # Rss of the mapping that begins at `start`
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            inside = int(head[0].split("-")[0], 16) == start
        elif inside and head[0] == "Rss:":
            return int(head[1]) * 1024

size = 16 << 20
with open(sys.argv[1], "wb") as f:
    f.write(bytes(range(256)) * (size // 256))
    f.flush()
    os.fsync(f.fileno())  # clean in the page cache, as a library's pages are
f = open(sys.argv[1], "rb")
shown = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # read-only: a library's code, say
kept = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and written: relocated data
kept[:5] = b"local"
fixed = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # written, then read-only: relocated constants
fixed[:5] = b"fixed"
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
fixed_at = ctypes.addressof(ctypes.c_char.from_buffer(fixed))
assert libc.mprotect(fixed_at, size, mmap.PROT_READ) == 0
checksum = sum(shown[i] for i in range(0, size, 4096))  # touch every page
a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
expected = (a @ a.T).tolist()
def cached_pages(start):
    # pages of the file under `shown` that the page cache holds (mincore)
    vector = (ctypes.c_ubyte * (size // 4096))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vector) == 0
    return sum(v & 1 for v in vector)

starts = {m: int(line.split("-")[0], 16) for line in open("/proc/self/maps") if line.rstrip().endswith(sys.argv[1])
          for m in [{"r--s": "shown", "rw-p": "kept", "r--p": "fixed"}[line.split()[1]]]}
before = {m: resident(start) for m, start in starts.items()}
released = release_library_pages()
after = {m: resident(start) for m, start in starts.items()}
cached = cached_pages(starts["shown"])
same = sum(shown[i] for i in range(0, size, 4096)) == checksum
print(json.dumps({"before": before, "after": after, "released": released, "cached_pages": cached,
                  "same": same and (a @ a.T).tolist() == expected and bytes(kept[:6]) == b"local\x05"
                          and bytes(fixed[:6]) == b"fixed\x05"}))
"""


def test_releasing_library_pages_frees_read_only_file_pages_only(tmp_path):
    """In a fresh process: the pages of a read-only file mapping this process alone maps go (a
    library's code, as libtorch's) and stay in the page cache, so reading them again reads no file;
    written private mappings of the same file keep their writes, whether still writable (relocated
    data) or made read-only since (relocated constants); what reads the released pages reads the
    same bytes again, and torch computes the same."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "lib.bin")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    mib = 2**20
    before, after = got["before"], got["after"]
    # The written copies hold a page each; the read one, all 16 MiB.
    assert before["kept"] <= 8 << 10 and before["fixed"] <= 8 << 10 and before["shown"] >= 15 * mib
    assert after == {"shown": 0, "kept": before["kept"], "fixed": before["fixed"]}
    assert got["released"] >= 15 * mib
    assert got["cached_pages"] == 4096  # all of them: reading them again is a minor fault each
    assert got["same"]


MALLOC_PROBE = """
import ctypes, resource
from lmserve.memory import large_blocks_mapped_apart

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped_apart(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    apart = libc.mallinfo2().hblks - before
    libc.free(block)
    return apart

def faults_again(size):
    # a block of `size` written, freed, then allocated and written again: the page faults of the second
    libc.free(ctypes.memset(libc.malloc(size), 1, size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults

with large_blocks_mapped_apart():
    inside = [mapped_apart(2 << 20), mapped_apart(512 << 10), faults_again(40 << 20)]
after = [mapped_apart(2 << 20), mapped_apart(40 << 20), faults_again(40 << 20)]
print(inside + after)
"""


def test_loading_maps_large_blocks_apart_then_serves_from_the_heap():
    """In a fresh process (the thresholds are process-wide): inside, a 2 MiB block gets its own
    mapping and a 512 KiB one does not, and a 40 MiB block is faulted in afresh (10,240 pages)
    each time it is allocated; after, blocks of any size come from the heap, and a 40 MiB block
    freed is the next one's memory, its pages already there."""
    done = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    inside_2m, inside_512k, inside_faults, after_2m, after_40m, after_faults = json.loads(done.stdout)
    assert (inside_2m, inside_512k, after_2m, after_40m) == (1, 0, 0, 0)
    assert inside_faults >= 10_000
    assert after_faults < 100
