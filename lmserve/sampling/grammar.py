"""Constrained decoding: compile a GrammarSpec once, keep one matcher per request, mask each step.

Backed by xgrammar: its compiler precomputes per-state token masks, so filling a row's mask
costs microseconds in most states; JSON strings with length bounds, which xgrammar masks slowly
(milliseconds to a second a row), are rewritten first (bounded_strings.py). A batch's masks are
filled on as many threads as torch computes on; applying them takes well under a millisecond.
Compiling is what can be slow, or crash on a hostile input: a spec is checked against limits
first (constraint_limits.py), then compiled in a worker process that is killed at a timeout or
when its request is abandoned (compile_pool.py).

xgrammar is imported, and its view of the vocabulary built, by the first request that carries a
constraint, in that request's worker thread, while the compile workers' forkserver starts beside it:
importing it pulls in transformers and huggingface_hub, ~33 MiB resident for the server's whole
life, and the forkserver holds more, which a server that never sees a constraint does not need.
That first request waits ~4 s for them here, a later new schema ~0.2 s (bench/RESULTS.md,
forty-first sitting).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmserve.memory import return_freed_memory
from lmserve.request import GrammarSpec
from lmserve.sampling.compile_pool import (
    IDLE_WORKER_S,
    POLL_INTERVAL_S,
    CompileAbandoned,
    CompilePool,
    CompilerCrashed,
    CompileTimeout,
    start_forkserver,
)
from lmserve.sampling.constraint_limits import (
    ConstraintLimitError,
    GrammarLimits,
    check_choices,
    check_document,
    check_size,
    unenforced_keywords,
)
from lmserve.sampling.schema_depth import MAX_SCHEMA_DEPTH, embedded_schemas, schema_depth
from lmserve.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled; the message names the problem."""


# xgrammar prefixes its messages with "[time] /path/file.cc:123: "; users need only the rest.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


# Compiled grammars cached for reuse. A compiled grammar holds per-state token masks (~1 MB for a
# small schema), and clients may send a new schema or tool set with every request: unbounded,
# the cache would grow for the server's lifetime. Evicted grammars live on in their matchers.
DEFAULT_MAX_CACHE_BYTES = 256 * 2**20
# Compiles running at once, each in its own worker process (compile_pool.py); more wait.
DEFAULT_MAX_COMPILE_WORKERS = 2


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer's vocabulary, in worker processes (each stopped
    once idle for `idle_worker_s`), after checking them against `limits`. Thread-safe; caches
    results, up to about `max_cache_bytes` (least recently used evicted first); `cache_bytes` is
    what it holds now.

    A compile takes one thread while `busy()` says the model is decoding (it must not take the
    cores decoding runs on), and as many as the model's (torch's) otherwise: a schema's compile
    is mostly a mask per grammar state, which xgrammar computes on its threads, so a new schema's
    first request waits about half as long on two (bench/RESULTS.md, twenty-seventh sitting)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
                 limits: GrammarLimits = GrammarLimits(), max_compile_workers: int = DEFAULT_MAX_COMPILE_WORKERS,
                 idle_worker_s: float = IDLE_WORKER_S, busy: Callable[[], bool] = lambda: False):
        self.tokenizer = tokenizer
        self.busy = busy
        self.vocab_size = vocab_size
        self.max_cache_bytes = max_cache_bytes
        self.limits = limits
        self.max_compile_workers = max_compile_workers
        self.idle_worker_s = idle_worker_s
        self._built: tuple[xgr.TokenizerInfo, CompilePool] | None = None
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._in_flight: dict[GrammarSpec, _Pending] = {}  # specs compiling now, for their other requests
        self._cache_bytes = 0
        self._lock = threading.Lock()

    def _backend(self) -> tuple[xgr.TokenizerInfo, CompilePool]:
        """The vocabulary as xgrammar sees it, and the worker pool, built on first use."""
        with self._lock:
            if self._built is None:
                info = self._tokenizer_info()
                self._built = info, CompilePool(info.serialize_json(), self.max_compile_workers,
                                                self.limits.compile_timeout_s, self.idle_worker_s)
            return self._built

    def _tokenizer_info(self) -> xgr.TokenizerInfo:
        import xgrammar as xgr

        # Special tokens get no bytes: the grammar can never emit them as text (a masked
        # <|im_end|> inside a JSON string would vanish from the decoded output). Stop tokens
        # are still allowed once the grammar is complete. Tool-call and reasoning markers keep
        # their text, so a grammar can write [TOOL_CALLS] as the one token the model was trained on.
        vocab = [_grammar_bytes(self.tokenizer, i) for i in range(self.tokenizer.vocab_size)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=sorted(self.tokenizer.eos_token_ids))

    def compile(self, spec: GrammarSpec, abandoned: threading.Event | None = None) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec`; GrammarError if it is invalid, over a limit, allows no
        output, or does not compile within the timeout. CompileAbandoned once `abandoned` is set
        (the request has gone): its compile is stopped.

        A spec being compiled for another request is waited for, not compiled again: a burst of
        requests with one new schema compiles it once (eight at once on one thread each had the
        last wait 6.6 s for a 1.3 s compile, bench/RESULTS.md). If that request goes, one of
        those waiting compiles it; an error is every waiter's."""
        while True:
            with self._lock:
                if spec in self._cache:
                    self._cache.move_to_end(spec)
                    return self._cache[spec]
                pending = self._in_flight.get(spec)
                if pending is None:
                    self._in_flight[spec] = pending = _Pending()
                    break  # this request compiles it
            outcome = pending.wait(abandoned)
            if outcome is not None:
                return outcome
            # its request went before it compiled: another try (this request may compile it)
        try:
            check_spec(spec, self.limits)
            compiled = self._compile(_as_compiled(spec), abandoned)
            self._remember(spec, compiled)
            pending.compiled = compiled
            return compiled
        except GrammarError as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._in_flight[spec]
            pending.done.set()

    def _compile(self, spec: GrammarSpec, abandoned: threading.Event | None) -> xgr.CompiledGrammar:
        if self._built is None:
            # The workers' forkserver imports xgrammar in a process of its own while this one
            # imports it and builds its view of the vocabulary (bench/RESULTS.md, forty-first sitting).
            start_forkserver()
        import xgrammar as xgr

        info, pool = self._backend()
        what = f"invalid {spec.kind.replace('_', ' ')}"
        try:
            threads = 1 if self.busy() else max(1, torch.get_num_threads())
            status, payload = pool.compile(spec.kind, spec.text, spec.strict, abandoned, threads)
        except CompileTimeout:
            raise GrammarError(f"{what}: it did not compile within the limit (compile_timeout_s) of "
                               f"{self.limits.compile_timeout_s:g} s") from None
        except CompilerCrashed as exc:
            raise GrammarError(f"{what}: {exc}") from None
        if status != "ok":
            raise GrammarError(f"{what}: {_clean(payload)}")
        compiled = xgr.CompiledGrammar.deserialize_json(payload, info)
        del payload
        # The JSON text of a grammar's masks is many times their size (a schema with a 400-character
        # bound: ~126 MiB of heap kept after an 8 MiB grammar); glibc would keep it.
        return_freed_memory()
        if allows_no_token(compiled, self.vocab_size):
            raise GrammarError(f"{what}: no output can satisfy it (it allows no first token)")
        return compiled

    def _remember(self, spec: GrammarSpec, compiled: xgr.CompiledGrammar) -> None:
        with self._lock:
            if spec in self._cache:
                return
            self._cache[spec] = compiled
            self._cache_bytes += compiled.memory_size_bytes
            while self._cache_bytes > self.max_cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.memory_size_bytes

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cache of compiled grammars now."""
        return self._cache_bytes

    @property
    def num_compile_workers(self) -> int:
        """Compile worker processes alive now."""
        return 0 if self._built is None else self._built[1].num_workers

    def matcher(self, spec: GrammarSpec) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))

    def close(self) -> None:
        """Stop the idle compile workers (the model is going away); later compiles start new ones."""
        if self._built is not None:
            self._built[1].close()


class _Pending:
    """A compile under way, as the other requests that want its spec wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.compiled: xgr.CompiledGrammar | None = None
        self.error: GrammarError | None = None

    def wait(self, abandoned: threading.Event | None) -> xgr.CompiledGrammar | None:
        """Its compiled grammar once done; its GrammarError, raised anew; None if it ended without
        either (its request went, or it failed otherwise). CompileAbandoned once `abandoned` is set."""
        while not self.done.wait(POLL_INTERVAL_S):
            if abandoned is not None and abandoned.is_set():
                raise CompileAbandoned()
        if self.error is not None:
            raise GrammarError(str(self.error))
        return self.compiled


@dataclass(frozen=True)
class RequestCompiler:
    """A GrammarCompiler as one request uses it: its compiles stop once `abandoned` is set (the
    client has gone), so a runaway compile does not outlive its request."""

    compiler: GrammarCompiler
    abandoned: threading.Event

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        return self.compiler.compile(spec, self.abandoned)


def allows_no_token(compiled: xgr.CompiledGrammar, vocab_size: int) -> bool:
    """Whether the grammar's start allows no token at all (its language is empty)."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32
    xgr.GrammarMatcher(compiled).fill_next_token_bitmask(bitmask, 0)
    return not bool(bitmask.any())


# Special tokens that tool-call and reasoning formats write as markup (Mistral, Llama 3, Qwen).
MARKUP_TOKENS = frozenset({b"[TOOL_CALLS]", b"[ARGS]", b"[CALL_ID]", b"<|python_tag|>", b"<tool_call>",
                           b"</tool_call>", b"<think>", b"</think>"})


def check_spec(spec: GrammarSpec, limits: GrammarLimits) -> None:
    """GrammarError if `spec` is over one of `limits`, nests too deep, or uses a schema keyword the
    compiler would ignore; checked before compiling, in time linear in its size."""
    what = f"invalid {'choice' if spec.kind == 'choice' else spec.kind.replace('_', ' ')}"
    try:
        if spec.kind == "choice":
            check_choices(json.loads(spec.text), limits)
            return
        check_size(spec.kind, spec.text, limits)
        if spec.kind in ("json_schema", "structural_tag"):
            _check_document(spec, limits)
    except ConstraintLimitError as exc:
        raise GrammarError(f"{what}: {exc}") from None


def _check_document(spec: GrammarSpec, limits: GrammarLimits) -> None:
    """Nodes and tags, then each schema's depth (deeper ones can crash the compiler,
    schema_depth.py) and keywords."""
    document = _parse_json(spec.text)
    if document is None:
        return  # not JSON: the compiler says what is wrong
    if document is not _TOO_DEEP:
        check_document(spec.kind, document, limits)
    schemas = [document] if spec.kind == "json_schema" else [document, *embedded_schemas(document)]
    for schema in schemas:
        if isinstance(schema, str):  # a structural tag may carry a schema as JSON text
            schema = _parse_json(schema)
        if schema is _TOO_DEEP or schema_depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: it nests deeper than {MAX_SCHEMA_DEPTH} "
                               "levels (objects and arrays, counting each $ref as nesting its target)")
        if spec.kind == "json_schema" or schema is not document:
            _check_keywords(spec, schema)


def _check_keywords(spec: GrammarSpec, schema: Any) -> None:
    for pointer, keyword, why in unenforced_keywords(schema):
        raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: the keyword {keyword!r} (at {pointer}) is "
                           f"not supported: {why} when decoding is constrained")


_TOO_DEEP = object()  # JSON nested past the parser's own recursion limit


def _parse_json(text: str) -> Any:
    """The value, _TOO_DEEP, or None for text that is not JSON (the compiler then says what is wrong)."""
    try:
        return json.loads(text)
    except RecursionError:
        return _TOO_DEEP
    except ValueError:
        return None


def _grammar_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    text = tokenizer.token_bytes(token_id)
    return text if not tokenizer.is_special(token_id) or text in MARKUP_TOKENS else b""


def _clean(exc: Exception) -> str:
    return _CPP_PREFIX.sub("", str(exc).strip()).strip()


def choice_spec(choices: list[str]) -> GrammarSpec:
    """Exactly one of `choices`, verbatim (vLLM's guided_choice); its limits are checked on the
    items, before it becomes a grammar."""
    return GrammarSpec("choice", json.dumps(choices, ensure_ascii=False))


def _as_compiled(spec: GrammarSpec) -> GrammarSpec:
    """`spec` in a kind the compiler takes: a choice becomes the grammar of its alternatives."""
    if spec.kind != "choice":
        return spec
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec.text))
    return GrammarSpec("ebnf", f"root ::= {alternatives}")


@dataclass
class GrammarMask:
    """One step's token masks for the constrained rows of a (B, V) logits tensor."""

    bitmask: torch.Tensor  # (B, ceil(V / 32)) int32, xgrammar's packed layout
    rows: list[int]  # batch rows that carry a grammar
    vocab_size: int

    @classmethod
    def fill(cls, matchers: dict[int, xgr.GrammarMatcher], batch_size: int, vocab_size: int) -> GrammarMask:
        """Masks of the next token for each batch row -> matcher; several rows' on torch's threads
        (xgrammar's batch matcher)."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
        rows = sorted(matchers)
        if len(rows) == 1:
            matchers[rows[0]].fill_next_token_bitmask(bitmask, rows[0])
        else:  # a batch matcher per step: engines of several models may fill masks at once
            batch = xgr.BatchGrammarMatcher(max(1, torch.get_num_threads()))
            batch.batch_fill_next_token_bitmask([matchers[row] for row in rows], bitmask, rows)
        return cls(bitmask, rows, vocab_size)

    def dead_rows(self) -> list[int]:
        """Constrained rows whose grammar allows no token now, opened to the whole vocabulary so they
        still sample (their request fails, but the batch's sampling does not: an all -inf row
        would make NaN probabilities)."""
        dead = [row for row in self.rows if not bool(self.bitmask[row].any())]
        self.bitmask[dead] = -1
        return dead

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens to -inf in the constrained rows, in place."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=self.rows,
                                        vocab_size=self.vocab_size)
