"""The synchronous engine: add requests, call step() until they finish."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from lmserve.cache.block_pool import BlockPool
from lmserve.cache.kv_cache import allocate_kv_caches, num_blocks_for_budget
from lmserve.config import EngineConfig
from lmserve.engine.runner import ModelRunner, StepResult
from lmserve.engine.scheduler import Scheduler
from lmserve.kernels import paged_decode_attention as native_decode_attention
from lmserve.request import FinishReason, Request, RequestOutput, SamplingParams
from lmserve.sampling.grammar import GrammarCompiler
from lmserve.text.detokenizer import IncrementalDetokenizer
from lmserve.weights.load import DTYPES, LoadedModel, load_model

log = logging.getLogger("lmserve.engine")


@dataclass
class StepStats:
    """What one step did; metrics consume these outside the core."""

    num_scheduled_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0
    kv_cache_usage: float = 0.0
    step_seconds: float = 0.0
    num_prefix_cache_queries: int = 0  # KV blocks looked up in the prefix cache, since start
    num_prefix_cache_hits: int = 0  # of those, blocks found cached, since start


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and every live request. Not thread-safe:
    one thread calls it (see AsyncEngine)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel):
        self.config = config
        self.tokenizer = loaded.tokenizer
        model_len = loaded.config.max_position_embeddings
        if (config.scheduler.max_model_len or 0) > model_len:
            raise ValueError(f"max_model_len {config.scheduler.max_model_len} exceeds the model's context "
                             f"length {model_len}")
        self.max_model_len = config.scheduler.max_model_len or model_len
        device = torch.device(config.device)
        block_size = config.cache.block_size
        self.dtype = loaded.dtype  # what config.dtype chose ("auto" picks the checkpoint's own)
        kv_dtype = DTYPES[loaded.dtype]  # the weights' dtype (bf16 under int8)
        num_blocks = num_blocks_for_budget(loaded.config, block_size, kv_dtype, config.cache.kv_cache_memory_bytes)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache budget holds {num_blocks * block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: raise --kv-cache-memory or lower --max-model-len")
        log.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, block_size, num_blocks * block_size)
        self.pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        sched_config = replace(config.scheduler, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(sched_config, block_size, self.pool)
        caches = allocate_kv_caches(loaded.config, num_blocks, block_size, kv_dtype, device)
        grammar = GrammarCompiler(self.tokenizer, loaded.config.vocab_size, num_threads=torch.get_num_threads())
        self.runner = ModelRunner(loaded.model, caches, block_size, device, grammar)
        if device.type == "cpu":  # load (or, once per machine, compile) now rather than in the first step
            native_layers = getattr(loaded.model, "native", None) is not None
            log.info("decode attention: %s; the steps' layers: %s",
                     "native kernel" if native_decode_attention() else "PyTorch", "C++" if native_layers else "Python")
        self.live: dict[str, _Tracked] = {}
        self.last_stats = StepStats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model_path, config.dtype, config.device,
                            max_positions=config.scheduler.max_model_len)
        return cls(config, loaded)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.live)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ValueError for a request that can never run."""
        if request_id in self.live:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context length is {self.max_model_len}")
        request = Request(request_id, list(prompt_ids), params, self.tokenizer.eos_token_ids, time.monotonic())
        detok = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        self.live[request_id] = _Tracked(request, detok)
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        tracked = self.live.get(request_id)
        if tracked is not None:
            self.scheduler.finish(tracked.request, FinishReason.ABORT)
            self._forget(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one batch through the model. If the model fails, every request in the batch
        finishes with an error output and the engine stays usable."""
        started = time.perf_counter()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            result = self.runner.execute(out)
        except Exception as exc:
            log.exception("engine step failed")
            return [self._fail(seq.request, exc) for seq in out.seqs]
        self.scheduler.update(out, result.token_ids)
        failed = [self._fail(self.live[rid].request, ValueError(why)) for rid, why in result.errors.items()]
        for rid in result.grammar_finished:  # complete grammar: nothing may follow (e.g. under ignore_eos)
            if not self.live[rid].request.is_finished:
                self.scheduler.finish(self.live[rid].request, FinishReason.STOP)
        outputs = failed + [self._output(seq.request, result) for seq in out.seqs
                            if seq.request.request_id in result.token_ids and seq.request.request_id in self.live]
        self._record(out, time.perf_counter() - started)
        return outputs

    def fail_all(self, exc: Exception) -> list[RequestOutput]:
        """Finish every live request with an error output (after an unexpected failure)."""
        return [self._fail(tracked.request, exc) for tracked in list(self.live.values())]

    def _fail(self, request: Request, exc: Exception) -> RequestOutput:
        self.scheduler.finish(request, FinishReason.ERROR)
        self._forget(request.request_id)
        return RequestOutput(request.request_id, [], finish_reason=FinishReason.ERROR,
                             num_prompt_tokens=len(request.prompt_ids), error=f"engine error: {exc}")

    def _output(self, request: Request, result: StepResult) -> RequestOutput:
        token = request.output_ids[-1]
        logprobs = result.logprobs.get(request.request_id)
        is_stop_token = request.finish_reason == FinishReason.STOP  # eos / stop id: not part of the text
        new_ids = [] if is_stop_token else [token]
        tracked = self.live[request.request_id]
        delta, stopped = tracked.detokenizer.add(new_ids) if new_ids else ("", False)
        if stopped:
            self.scheduler.finish(request, FinishReason.STOP)
        if request.is_finished and not stopped:
            delta += tracked.detokenizer.flush()
        if request.is_finished:
            self._forget(request.request_id)
        return RequestOutput(
            request.request_id, new_ids, delta,
            [logprobs] if logprobs is not None and new_ids else None,
            request.finish_reason, len(request.prompt_ids), request.num_cached_prompt_tokens)

    def _forget(self, request_id: str) -> None:
        self.live.pop(request_id, None)
        self.runner.forget(request_id)

    def _record(self, out, seconds: float) -> None:
        self.last_stats = StepStats(out.num_tokens, len(self.scheduler.running), len(self.scheduler.waiting),
                                    out.num_preempted, self.pool.usage, seconds,
                                    self.pool.num_queries, self.pool.num_hits)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Convenience for tests and offline use: run prompts to completion, return token ids."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.live for rid in ids):
            for output in self.step():
                if output.request_id in tokens:
                    tokens[output.request_id].extend(output.new_token_ids)
        return [tokens[rid] for rid in ids]
