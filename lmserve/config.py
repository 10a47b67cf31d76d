"""Frozen configuration, validated once, flowing one way: CLI -> config -> constructors."""

from __future__ import annotations

from dataclasses import dataclass, field

# The serving dtypes, each with the torch dtype, by name, of the weights that stay floating point
# and of the KV cache (the int8 and int4 kinds keep bf16 for both). Names, not torch dtypes: a
# process that only plans servers (the benchmark) reads this without importing torch.
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# What --dtype takes: a serving dtype, or "auto" (the checkpoint's own; lmserve/weights/dtype.py).
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds requests in flight get to finish once the server is stopping


KV_CACHE_DTYPES = ("auto", "int8")
DEFAULT_SPECULATIVE_TOKENS = 4  # the server's prompt-lookup drafts per step (greedy requests)
DEFAULT_DRAFT_TOKENS = 8  # a draft model's drafts per step (--draft-tokens)
DEFAULT_MAX_STEP_MS = 250.0  # the time bound on a step's prompt tokens beside decodes (--max-step-ms)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: fixed blocks of `block_size` tokens, as many as the memory budget holds, or
    as many as hold `kv_cache_tokens` tokens when that is set (llama-server's -c counts tokens)."""

    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    enable_prefix_caching: bool = True
    kv_cache_tokens: int | None = None  # the budget in tokens, whatever a token takes; None: the bytes decide
    kv_cache_dtype: str = "auto"  # "auto": the weights' float type; "int8": int8 rows with a scale each

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv cache memory must be > 0")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be >= 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one engine step may take on."""

    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens through the model in one step (chunked prefill budget)
    max_model_len: int | None = None  # prompt + output tokens of one sequence; None: the model's own
    num_speculative_tokens: int = 0  # prompt lookup's (and forced text's) drafts per step and sequence; 0: off
    speculative_sampling: bool = False  # sampled (not only greedy) requests take drafts too
    # a step that decodes takes the prompt tokens that keep it within about this many ms (step_cost.py); 0: no bound
    max_step_ms: float = DEFAULT_MAX_STEP_MS

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if not self.max_step_ms >= 0:
            raise ValueError("max_step_ms must be >= 0")


@dataclass(frozen=True)
class DraftConfig:
    """A draft model for speculative decoding (--draft-model): its checkpoint, serving dtype and
    drafts per step and sequence (--draft-tokens)."""

    model_path: str
    dtype: str = "auto"
    tokens: int = DEFAULT_DRAFT_TOKENS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"unsupported draft dtype {self.dtype!r} ({', '.join(DTYPE_CHOICES)})")
        if self.tokens < 1:
            raise ValueError("draft tokens must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    served_model_name: str
    dtype: str = "auto"  # matmul weights and KV cache (DTYPE_CHOICES); activations and norms stay float32
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads for the engine; None keeps torch's default
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    chat_template: str | None = None  # Jinja source used instead of the model's own; None: the model's
    draft: DraftConfig | None = None  # drafts from this model instead of prompt lookup (engine/draft_model.py)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"unsupported dtype {self.dtype!r} ({', '.join(DTYPE_CHOICES)})")


@dataclass(frozen=True)
class EmbeddingConfig:
    """An embedding model (an HF folder of a BERT-family encoder) served beside the chat model."""

    model_path: str
    served_model_name: str
    max_batch_tokens: int = 8192  # padded tokens (sequences x longest) per encoder forward

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
