"""Build the native kernels now: `python -m lmserve.kernels` (exit status 1 if they cannot be built)."""

import sys

from lmserve.kernels import build_directory, paged_decode_attention

if paged_decode_attention() is None:
    sys.exit("lmserve: native kernels could not be built; the server will use its PyTorch path")
print(f"lmserve: native kernels ready in {build_directory()}")
