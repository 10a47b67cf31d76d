"""Giving start-up-only memory back: which mappings are released, and that releasing them frees
resident memory without changing what the process computes."""

from __future__ import annotations

import json
import subprocess
import sys

from lmserve.memory import read_only_file_mappings

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 123  /usr/bin/python3.11
55d0c0a01000-55d0c0c00000 r-xp 00001000 08:01 123  /usr/bin/python3.11
55d0c0e00000-55d0c0e10000 rw-p 00400000 08:01 123  /usr/bin/python3.11
55d0c1000000-55d0c5000000 rw-p 00000000 00:00 0    [heap]
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
7f1000000000-7f1010000000 r-xp 00100000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so
7f1010000000-7f1010100000 r--p 10100000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so
7f1010100000-7f1010200000 rw-p 10200000 08:01 456  /venv/lib/torch/lib/libtorch_cpu.so
7f2000000000-7f2000001000 r--s 00000000 08:01 789  /tmp/shared with spaces.bin
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0    [stack]
7ffc00100000-7ffc00102000 r-xp 00000000 00:00 0    [vdso]
"""


def test_only_read_only_file_mappings_are_released():
    """Code and constants of files: yes. Relocated data (rw-p), the heap, anonymous memory, the
    stack and the vdso: never (their pages may exist nowhere else)."""
    found = read_only_file_mappings(MAPS)
    assert [(hex(start), hex(end), path) for start, end, path in found] == [
        ("0x55d0c0a00000", "0x55d0c0a01000", "/usr/bin/python3.11"),
        ("0x55d0c0a01000", "0x55d0c0c00000", "/usr/bin/python3.11"),
        ("0x7f1000000000", "0x7f1010000000", "/venv/lib/torch/lib/libtorch_cpu.so"),
        ("0x7f1010000000", "0x7f1010100000", "/venv/lib/torch/lib/libtorch_cpu.so"),
        ("0x7f2000000000", "0x7f2000001000", "/tmp/shared with spaces.bin"),
    ]


PROBE = """
import json, mmap, sys, torch
from lmserve.memory import release_startup_pages, resident_bytes

def resident(start, end):
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
f = open(sys.argv[1], "rb")
shown = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)  # read-only: a library's code, say
kept = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and written: relocated data
kept[:5] = b"local"
checksum = sum(shown[i] for i in range(0, size, 4096))  # touch every page
a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
expected = (a @ a.T).tolist()
maps = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")
        if line.rstrip().endswith(sys.argv[1])]
before = {m: resident(*m) for m in maps}
released = release_startup_pages()
after = {m: resident(*m) for m in maps}
print(json.dumps({"before": sorted(before.values()), "after": sorted(after.values()), "released": released,
                  "same": (a @ a.T).tolist() == expected and bytes(kept[:6]) == b"local\x05"
                          and sum(shown[i] for i in range(0, size, 4096)) == checksum}))
"""


def test_releasing_startup_pages_frees_read_only_file_pages_only(tmp_path):
    """In a fresh process: the pages of a read-only file mapping this process alone maps go (a
    library's code, as libtorch's; those shared with another process stay, the kernel skips them),
    a written private mapping of the same file keeps its pages and its writes, what reads the
    released pages reads the same bytes again, and torch computes the same."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "lib.bin")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    mib = 2**20
    kept_before, shown_before = got["before"]  # the written copy holds 1 page; the read one, all 16 MiB
    assert kept_before <= 8 << 10 and shown_before >= 15 * mib
    assert got["after"] == [0, kept_before]
    assert got["released"] >= 15 * mib
    assert got["same"]


MALLOC_PROBE = """
import ctypes
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

with large_blocks_mapped_apart():
    inside = [mapped_apart(2 << 20), mapped_apart(512 << 10)]
after = [mapped_apart(2 << 20), mapped_apart(40 << 20)]
print(inside + after)
"""


def test_loading_maps_large_blocks_apart_then_restores_server_thresholds():
    """In a fresh process (the thresholds are process-wide): inside, a 2 MiB block gets its own
    mapping and a 512 KiB one does not; after, 2 MiB comes from the heap again and only blocks
    above 32 MiB are mapped apart."""
    done = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [1, 0, 0, 1]
