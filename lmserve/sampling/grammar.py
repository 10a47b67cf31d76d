"""Constrained decoding: compile a GrammarSpec once, keep one matcher per request, mask each step.

Backed by xgrammar: its compiler caches compiled grammars and precomputes per-state token masks,
so filling a row's mask costs microseconds and applying the masks of a whole batch well under a
millisecond (measured on the 49k-token SmolLM2 vocabulary), far below a forward step.

xgrammar is imported, and its view of the vocabulary built, by the first request that carries a
constraint (~0.8 s once, in that request's worker thread): importing it pulls in transformers and
huggingface_hub, ~33 MiB resident for the server's whole life, which a server that never sees a
constraint does not need.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lmserve.request import GrammarSpec
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


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer's vocabulary. Thread-safe; caches results, up to about
    `max_cache_bytes` (least recently used evicted first); `cache_bytes` is what it holds now."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, num_threads: int = 1,
                 max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.num_threads = num_threads
        self.max_cache_bytes = max_cache_bytes
        self._built: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    @property
    def _compiler(self) -> xgr.GrammarCompiler:
        """xgrammar's compiler, built on first use (see the module's docstring)."""
        if self._built is None:
            with self._lock:
                if self._built is None:
                    self._built = self._build()
        return self._built

    def _build(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        # Special tokens get no bytes: the grammar can never emit them as text (a masked
        # <|im_end|> inside a JSON string would vanish from the decoded output). Stop tokens
        # are still allowed once the grammar is complete. Tool-call and reasoning markers keep
        # their text, so a grammar can write [TOOL_CALLS] as the one token the model was trained on.
        vocab = [_grammar_bytes(self.tokenizer, i) for i in range(self.tokenizer.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=sorted(self.tokenizer.eos_token_ids))
        return xgr.GrammarCompiler(info, max_threads=self.num_threads, cache_enabled=True,
                                   cache_limit_bytes=self.max_cache_bytes)

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec`; GrammarError if it is invalid."""
        try:
            check_schema_depth(spec)
            return self._compile(spec)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {_clean(exc)}") from None

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        if spec.kind == "json_object":  # any object, compact like json_schema below
            return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            # Compact JSON: with free whitespace a sampled model can pad forever between tokens.
            return self._compiler.compile_json_schema(spec.text, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.text)
        if spec.kind == "ebnf":
            return self._compiler.compile_grammar(spec.text)
        if spec.kind == "structural_tag":
            return self._compiler.compile_structural_tag(spec.text)
        raise ValueError(f"unknown grammar kind {spec.kind!r}")

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cache of compiled grammars now."""
        return 0 if self._built is None else self._built.get_cache_size_bytes()

    def matcher(self, spec: GrammarSpec) -> xgr.GrammarMatcher:
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


# Special tokens that tool-call and reasoning formats write as markup (Mistral, Llama 3, Qwen).
MARKUP_TOKENS = frozenset({b"[TOOL_CALLS]", b"[ARGS]", b"[CALL_ID]", b"<|python_tag|>", b"<tool_call>",
                           b"</tool_call>", b"<think>", b"</think>"})


def check_schema_depth(spec: GrammarSpec) -> None:
    """GrammarError if a JSON schema in `spec` (its own, or one a structural tag carries) nests deeper
    than MAX_SCHEMA_DEPTH: deeper ones can crash the compiler (schema_depth.py)."""
    if spec.kind not in ("json_schema", "structural_tag"):
        return
    document = _parse_json(spec.text)
    schemas = [document] if spec.kind == "json_schema" else [document, *embedded_schemas(document)]
    for schema in schemas:
        if isinstance(schema, str):  # a structural tag may carry a schema as JSON text
            schema = _parse_json(schema)
        if schema is _TOO_DEEP or schema_depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: it nests deeper than {MAX_SCHEMA_DEPTH} "
                               "levels (objects and arrays, counting each $ref as nesting its target)")


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
    """Exactly one of `choices`, verbatim (vLLM's guided_choice)."""
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return GrammarSpec("ebnf", f"root ::= {alternatives}")


@dataclass
class GrammarMask:
    """One step's token masks for the constrained rows of a (B, V) logits tensor."""

    bitmask: torch.Tensor  # (B, ceil(V / 32)) int32, xgrammar's packed layout
    rows: list[int]  # batch rows that carry a grammar
    vocab_size: int

    @classmethod
    def fill(cls, matchers: dict[int, xgr.GrammarMatcher], batch_size: int, vocab_size: int) -> GrammarMask:
        """Masks of the next token for each batch row -> matcher."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
        for row, matcher in matchers.items():
            matcher.fill_next_token_bitmask(bitmask, row)
        return cls(bitmask, sorted(matchers), vocab_size)

    def apply(self, logits: torch.Tensor) -> None:
        """Set disallowed tokens to -inf in the constrained rows, in place."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=self.rows,
                                        vocab_size=self.vocab_size)
