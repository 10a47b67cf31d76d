"""Converted weights kept ready to map: an int4 or int8 model as the load leaves it (quantized,
rotated, packed for this CPU's kernels) is saved once in the user's cache, and later loads of the
same checkpoint map that file instead of converting again (the default model here: 1.3 s of
conversion against 0.03 s of mapping; bench/RESULTS.md, "forty-second sitting"). Mapped pages are
the page cache's, so servers and replicas of one model on a machine share them.

An entry is keyed by the checkpoint (the path, and the size, times and inode of each file the load
reads), the dtype asked for and the one served, the context the model is built for, and
everything that decides the converted layout: lmserve's model and weights code, torch's version,
this CPU's flags, the kernels' build (or their absence) and the formats the conversion would choose
with them. A checkpoint keeps one entry for each dtype it is served in: a new one replaces it.
Nothing is written for float32 and bfloat16 models (their load converts little, and a copy would
double their bytes on disk) nor where the model holds a tensor that cannot be saved (oneDNN's bf16
layout).

LMSERVE_WEIGHTS_CACHE names the folder (default ~/.cache/lmserve/weights), or "none" for no cache.
The files are pickles of the model object, trusted as the kernels' built modules beside them are:
a folder another user owns or may write to is not used (a warning says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from lmserve.cpu import cpu_flags

log = logging.getLogger(__name__)

CACHED_DTYPES = frozenset({"int4", "int8"})
_CODE = [Path(__file__).parents[1] / "model", Path(__file__).parent]  # what makes the layout
_CHECKPOINT_SUFFIXES = (".json", ".safetensors")  # the files a folder's load reads


def cache_root() -> Path | None:
    setting = os.environ.get("LMSERVE_WEIGHTS_CACHE", "")
    if setting.lower() == "none":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "lmserve" / "weights"


def entry_path(path: Path, requested: str, served: str, device: str, max_positions: int | None) -> Path | None:
    """Where the converted copy of the checkpoint at `path` lives (whether or not it is there yet);
    None when such a model is not cached."""
    root = cache_root()
    if root is None or served not in CACHED_DTYPES or torch.device(device).type != "cpu" or not _private(root):
        return None
    source = path.resolve()
    key = hashlib.sha256()
    files = sorted(f for f in source.iterdir() if f.suffix in _CHECKPOINT_SUFFIXES) if source.is_dir() else [source]
    for file in files:
        stat = file.stat()
        # ctime and inode too: a file put in place keeping the old one's size and time (rsync -t,
        # cp -p, a requantization of the same size) still has a new change time, or a new inode
        key.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\0".encode())
    key.update(f"{requested}\0{served}\0{max_positions}\0{torch.__version__}\0{platform.machine()}\0".encode())
    key.update(" ".join(sorted(cpu_flags())).encode())
    key.update(_kernels_key().encode())
    key.update(_layout_key().encode())
    key.update(_code_key())
    return root / f"{_source_key(source, served)}-{key.hexdigest()[:16]}.pt"


def load(entry: Path) -> torch.nn.Module | None:
    """The model saved at `entry`, its tensors mapped from the file; None if there is none or it
    cannot be read (the load then converts, and saves over it)."""
    if not entry.is_file():
        return None
    try:
        model = torch.load(entry, mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a file cut short or from another build: converted again
        log.warning("converted weights %s unreadable (%s: %s); converting the checkpoint again", entry,
                    type(exc).__name__, exc)
        return None
    log.info("weights mapped from %s", entry)
    return model


def save(entry: Path, model: torch.nn.Module) -> bool:
    """Write `model` (as the load leaves it, before its native layers) to `entry`, replacing the
    checkpoint's older entries; False, with a log line, where it cannot be saved."""
    try:
        entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=entry.parent, prefix=".partial-", suffix=".pt", delete=False) as out:
            partial = Path(out.name)
            try:
                torch.save(model, out)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, entry)  # readers see a whole file or none
    except Exception as exc:  # noqa: BLE001 - an unwritable cache or an unsaveable tensor: not cached
        log.info("converted weights not kept (%s: %s)", type(exc).__name__, exc)
        return False
    for older in entry.parent.glob(entry.name.split("-")[0] + "-*.pt"):
        if older != entry:
            with contextlib.suppress(OSError):
                older.unlink()
    return True


def _source_key(source: Path, served: str) -> str:
    return hashlib.sha256(f"{source}\0{served}".encode()).hexdigest()[:16]


def _private(root: Path) -> bool:
    """Whether `root` is absent or this user's alone: its files are loaded as code would be."""
    try:
        status = root.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        log.warning("converted weights not kept in %s: another user owns it or may write to it", root)
        return False
    return True


def _kernels_key() -> str:
    from lmserve.kernels import build_directory, native_module

    return build_directory().name if native_module() is not None else "no kernels"


def _layout_key() -> str:
    """What the projections' conversion asks of this machine, asked as it asks it (through the
    modules that choose the formats): the CPU's flags and the kernels' build decide these, and so
    does a test that stands one of them in."""
    from lmserve.model import linear
    from lmserve.model.weight_formats import floating

    return repr([linear.int4_linear_supported(), linear.packs_weights(), linear.int8_matmul_pays(),
                 floating.bf16_panels_run(), floating.packs_bf16()])


def _code_key() -> bytes:
    key = hashlib.sha256()
    for folder in _CODE:
        for file in sorted(folder.rglob("*.py")):
            key.update(file.read_bytes())
    return key.digest()
