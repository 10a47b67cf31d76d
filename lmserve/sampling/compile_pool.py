"""Grammar compiles in worker processes, so one that runs away can be stopped.

xgrammar compiles in C++ and cannot be interrupted from Python: in a thread of the server, a
hostile constraint (a long maxLength, a huge alternation) would hold a core and its request for
minutes after the client left, and a compiler crash would take the server down. In a worker
process it is killed at the compile timeout or as soon as its request is abandoned, and a crash
costs only that worker. Workers fork from multiprocessing's forkserver, which has xgrammar
imported once, so a new worker is ready in tens of milliseconds; what they cost in memory and
time is in bench/RESULTS.md ("Grammar compile limits").

A worker returns the compiled grammar serialized; the caller deserializes it against its own
tokenizer info.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
import weakref
from typing import Any

from lmserve.memory import return_freed_memory
from lmserve.sampling import bounded_strings

# How often a waiting caller looks at its deadline and at its request.
POLL_INTERVAL_S = 0.02
# A worker's start: the forkserver's first start imports xgrammar (seconds on a busy machine).
MAX_START_S = 120.0
# A worker idle this long is stopped: it holds ~75 MiB of its own (PSS ~136 MiB, after a compile
# and the heap it handed back; bench/RESULTS.md, twenty-sixth sitting), and a new one starts in
# ~0.4 s.
IDLE_WORKER_S = 60.0


def start_forkserver() -> Any:
    """The forkserver context the workers start from, its server process started now if it was
    not: it imports xgrammar once (torch and transformers with it, ~3.5 s in a new process here)
    and the workers forked from it share it. With the main module preloaded too, a worker does not
    import it again (lmserve's CLI: ~0.5 s each). Returns at once: the process imports on its own,
    so a caller can do other work while it does."""
    from multiprocessing import forkserver

    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "xgrammar", __name__])
    forkserver.ensure_running()
    return context


class CompileTimeout(Exception):
    """The compile ran past the timeout; its worker was killed."""


class CompileAbandoned(Exception):
    """The request that wanted the compile has gone; its worker was killed."""


class CompilerCrashed(Exception):
    """The worker died while compiling (the compiler crashed on the input)."""


class CompilePool:
    """Up to `max_workers` worker processes, started when needed and stopped after `idle_s` unused,
    each compiling one grammar at a time against the tokenizer `tokenizer_info_json` (xgrammar's
    TokenizerInfo) describes. Thread-safe."""

    def __init__(self, tokenizer_info_json: str, max_workers: int, timeout_s: float, idle_s: float = IDLE_WORKER_S):
        # Workers read the tokenizer from a file: as a process argument, its 1.6 MB would block the
        # start until the new worker had imported the main module and read it.
        fd, self.tokenizer_info_path = tempfile.mkstemp(prefix="lmserve-tokenizer-", suffix=".json")
        with os.fdopen(fd, "w") as file:
            file.write(tokenizer_info_json)
        weakref.finalize(self, os.remove, self.tokenizer_info_path)
        self.max_workers = max_workers
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self._context = start_forkserver()
        self._idle: list[tuple[_Worker, float]] = []  # and since when, most recently idle last
        self._num_workers = 0
        self._changed = threading.Condition()
        self._reaper: threading.Thread | None = None

    def compile(self, kind: str, text: str, strict: bool, abandoned: threading.Event | None = None,
                threads: int = 1) -> tuple[str, str]:
        """("ok", serialized CompiledGrammar) or ("invalid", why) for an input the compiler refused,
        compiled on `threads` threads. Raises CompileTimeout, CompileAbandoned (once `abandoned` is
        set), CompilerCrashed."""
        worker = self._acquire(abandoned)
        kept = False
        try:
            reply = worker.run((kind, text, strict, threads), self.timeout_s, abandoned)
            kept = True
            return reply
        finally:
            self._release(worker, kept)

    @property
    def num_workers(self) -> int:
        """Worker processes alive now, busy or idle."""
        return self._num_workers

    def close(self) -> None:
        """Stop the idle workers; a busy one stops when its compile ends."""
        with self._changed:
            idle, self._idle = self._idle, []
            self._num_workers -= len(idle)
        for worker, _ in idle:
            worker.stop()

    def _acquire(self, abandoned: threading.Event | None) -> _Worker:
        with self._changed:
            while not self._idle and self._num_workers >= self.max_workers:
                if abandoned is not None and abandoned.is_set():
                    raise CompileAbandoned()
                self._changed.wait(POLL_INTERVAL_S)
            if self._idle:
                return self._idle.pop()[0]
            self._num_workers += 1
        try:
            return _Worker(self._context, self.tokenizer_info_path, abandoned)
        except BaseException:
            self._release(None, False)
            raise

    def _release(self, worker: _Worker | None, keep: bool) -> None:
        with self._changed:
            if keep and worker is not None:
                self._idle.append((worker, time.monotonic()))
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="lmserve-grammar-reaper", daemon=True)
                    self._reaper.start()
            else:
                self._num_workers -= 1
            self._changed.notify_all()

    def _reap(self) -> None:
        """Stop workers idle for `idle_s`, while any are idle."""
        while True:
            with self._changed:
                if not self._idle:
                    self._reaper = None
                    return
                now = time.monotonic()
                expired = [worker for worker, since in self._idle if now - since >= self.idle_s]
                if not expired:
                    self._changed.wait(min(since for _, since in self._idle) + self.idle_s - now)
                    continue
                self._idle = [(worker, since) for worker, since in self._idle if now - since < self.idle_s]
                self._num_workers -= len(expired)
            for worker in expired:
                worker.stop()


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self, context: Any, tokenizer_info_path: str, abandoned: threading.Event | None):
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=serve, args=(child_conn, tokenizer_info_path), daemon=True,
                                       name="lmserve-grammar-compile")
        self.process.start()
        child_conn.close()
        not_started = CompilerCrashed("the grammar compile worker did not start")
        self._wait(time.monotonic() + MAX_START_S, abandoned, not_started)
        try:
            self.conn.recv()  # "ready"
        except EOFError:
            self.stop()
            raise not_started from None

    def _wait(self, deadline: float, abandoned: threading.Event | None, timed_out: Exception) -> None:
        """Until the worker has sent something (or died); killed first if abandoned or past `deadline`."""
        while not self.conn.poll(POLL_INTERVAL_S):
            if abandoned is not None and abandoned.is_set():
                self.stop()
                raise CompileAbandoned()
            if time.monotonic() > deadline:
                self.stop()
                raise timed_out

    def run(self, job: tuple[str, str, bool, int], timeout_s: float,
            abandoned: threading.Event | None) -> tuple[str, str]:
        self.conn.send(job)
        self._wait(time.monotonic() + timeout_s, abandoned, CompileTimeout())  # poll is also True once it died
        try:
            return self.conn.recv()
        except EOFError:
            self.stop()
            raise CompilerCrashed(f"the compiler crashed on it (exit code {self.process.exitcode})") from None

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def serve(conn: Any, tokenizer_info_path: str) -> None:
    """A worker's loop: (kind, text, strict, threads) in, ("ok", serialized) or ("invalid", why) out."""
    import xgrammar as xgr

    with open(tokenizer_info_path) as file:
        info = xgr.TokenizerInfo.deserialize_json(file.read())
    compilers = {}  # by threads; no cache: the caller keeps one
    conn.send("ready")
    while True:
        try:
            kind, text, strict, threads = conn.recv()
        except EOFError:
            return
        if threads not in compilers:
            compilers[threads] = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        try:
            conn.send(("ok", compile_with(compilers[threads], info.vocab_size, kind, text, strict).serialize_json()))
        except UnicodeDecodeError as exc:  # the compiler's message, cut inside a character of the input's
            conn.send(("invalid", exc.object.decode("utf-8", "replace") if isinstance(exc.object, bytes) else str(exc)))
        except (RuntimeError, ValueError, TypeError) as exc:
            conn.send(("invalid", str(exc)))
        return_freed_memory()  # a compile's working memory, which glibc would keep while the worker idles


def json_schema_grammar(schema: str, strict: bool, vocab_size: int) -> Any:
    """xgrammar's grammar of a JSON schema, compact (with free whitespace a sampled model can pad
    forever between tokens), its length-bounded strings mended (bounded_strings.py)."""
    import xgrammar as xgr

    return _mended(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict), vocab_size)


def _mended(grammar: Any, vocab_size: int) -> Any:
    """`grammar` with its length-bounded strings mended (bounded_strings.py); itself if it has none."""
    import xgrammar as xgr

    text = str(grammar)
    mended = bounded_strings.mend(text, vocab_size)
    return grammar if mended == text else xgr.Grammar.from_ebnf(mended)


def compile_with(compiler: Any, vocab_size: int, kind: str, text: str, strict: bool) -> Any:
    """xgrammar's CompiledGrammar of one GrammarSpec's kind and text, for a vocabulary of `vocab_size`."""
    if kind == "json_object":  # any object, compact like json_schema below
        return compiler.compile_grammar(json_schema_grammar('{"type": "object"}', False, vocab_size))
    if kind == "json_schema":
        return compiler.compile_grammar(json_schema_grammar(text, strict, vocab_size))
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "ebnf":
        return compiler.compile_grammar(text)
    if kind == "structural_tag":  # tool calls: their arguments' schemas, mended as above
        import xgrammar as xgr

        # The same compiled grammar as compile_structural_tag's (checked: serialized alike), and
        # its conversion costs ~0.3 ms.
        return compiler.compile_grammar(_mended(xgr.Grammar.from_structural_tag(text), vocab_size))
    raise ValueError(f"unknown grammar kind {kind!r}")
