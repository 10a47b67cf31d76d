"""The synchronous engine: add requests, call step() until they finish."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmserve.cache.block_pool import BlockPool
from lmserve.cache.kv_cache import allocate_kv_caches, bytes_per_block
from lmserve.cache.kv_file import (
    KV_DTYPE_NAMES,
    KVFile,
    KVFileIdentity,
    checkpoint_fingerprint,
    open_kv_file,
    write_kv_file,
)
from lmserve.cache.prefix import BlockHash, hash_full_blocks
from lmserve.config import EngineConfig
from lmserve.engine.batch import LiveRequest, SchedulerOutput
from lmserve.engine.draft_model import DraftModel
from lmserve.engine.runner import ModelRunner, StepResult
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sizing import check_sizes, kv_dtype
from lmserve.engine.step_types import EngineClosed, EngineLoad, EngineStep, StepStats
from lmserve.kernels import paged_decode_attention as native_decode_attention
from lmserve.request import FinishReason, Request, RequestOutput, SamplingParams
from lmserve.sampling.grammar import GrammarCompiler
from lmserve.sampling.processors import BiasTensors
from lmserve.text.detokenizer import IncrementalDetokenizer
from lmserve.weights.load import LoadedModel, load_model

log = logging.getLogger("lmserve.engine")

# Characters of a forced text tokenized for each draft wanted: a forced text's tokens (keys,
# punctuation) spell a few characters each (SmolLM2's longest token, a run of spaces, 81 bytes); a
# last token cut short is only a draft that does not stand.
FORCED_CHARS_PER_TOKEN = 64


def _kv_identity(config: EngineConfig, loaded: LoadedModel, block_size: int) -> KVFileIdentity | None:
    """What a saved prefix must match to be restored here; None when the checkpoint is not on disk
    (an engine built from weights in memory). Read now: the file could change while the engine runs."""
    fingerprint = checkpoint_fingerprint(config.model_path)
    if fingerprint is None:
        return None
    model = loaded.config
    return KVFileIdentity(family=model.family, num_hidden_layers=model.num_hidden_layers,
                          num_key_value_heads=model.num_key_value_heads, head_dim=model.head_dim,
                          block_size=block_size, dtype=loaded.dtype,
                          kv_dtype=KV_DTYPE_NAMES[kv_dtype(config.cache, loaded.dtype)],
                          weights=fingerprint)


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and every live request. Not thread-safe:
    one thread calls it (see AsyncEngine).

    Its public face: add_request, abort_request, step, fail_all, has_unfinished, load, close,
    save_prefix, restore_prefix, forget_prefix, and what other parts read: tokenizer,
    max_model_len, dtype, kv_block_bytes, grammar (the constraint compiler) and model (the
    decoder, for embeddings)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None = None):
        """`draft`: a model whose greedy tokens are this one's speculative drafts (draft_model.py),
        loaded from config.draft by from_config; ValueError if its tokens differ from `loaded`'s."""
        self.config = config
        self.tokenizer = loaded.tokenizer
        if config.chat_template is not None:  # --chat-template: every chat model renders this one
            self.tokenizer = replace(loaded.tokenizer, chat_template=config.chat_template)
        self.model = loaded.model
        self.max_model_len, num_blocks = check_sizes(config, loaded.config, loaded.dtype)
        self.device = torch.device(config.device)
        block_size = config.cache.block_size
        self.dtype = loaded.dtype  # what config.dtype chose ("auto" picks the checkpoint's own)
        cache_dtype = kv_dtype(config.cache, loaded.dtype)
        self.kv_block_bytes = bytes_per_block(loaded.config, block_size, cache_dtype)
        log.info("KV cache: %d blocks of %d tokens (%d tokens)", num_blocks, block_size, num_blocks * block_size)
        self._pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
        sched_config = replace(config.scheduler, max_model_len=self.max_model_len)
        self._draft = (None if draft is None else
                       DraftModel.for_target(draft, loaded, config, self.max_model_len, num_blocks * block_size))
        self._scheduler = Scheduler(sched_config, block_size, self._pool, self._draft, self._forced_ids)
        caches = allocate_kv_caches(loaded.config, num_blocks, block_size, cache_dtype, self.device)
        # A compile takes the cores only while nothing decodes (one thread otherwise).
        self.grammar = GrammarCompiler(self.tokenizer, loaded.config.vocab_size, busy=lambda: bool(self._live))
        self._runner: ModelRunner | None = ModelRunner(loaded.model, caches, block_size, self.device)
        if self.device.type == "cpu":  # load (or, once per machine, compile) now rather than in the first step
            native_layers = getattr(loaded.model, "native", None) is not None
            log.info("decode attention: %s; the steps' layers: %s",
                     "native kernel" if native_decode_attention() else "PyTorch", "C++" if native_layers else "Python")
        self._live: dict[str, LiveRequest] = {}
        self.num_draft_tokens = 0  # speculative drafts verified since start (speculation.py, draft_model.py)
        self.num_accepted_tokens = 0  # of those, drafts kept
        self._block_size = block_size
        self._kv_identity = _kv_identity(config, loaded, block_size)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model_path, config.dtype, config.device,
                            max_positions=config.scheduler.max_model_len)
        draft = None
        if config.draft is not None:
            draft = load_model(config.draft.model_path, config.draft.dtype, config.device,
                               max_positions=config.scheduler.max_model_len)
            log.info("draft model %s (%s) proposes up to %d tokens per step", config.draft.model_path, draft.dtype,
                     config.draft.tokens)
        return cls(config, loaded, draft)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._live)

    def load(self) -> EngineLoad:
        """Current load; safe to read from another thread (approximate while a step runs)."""
        return EngineLoad(num_running=len(self._scheduler.running), num_waiting=len(self._scheduler.waiting),
                          num_kv_blocks=self._pool.num_blocks, num_free_kv_blocks=self._pool.num_free)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request. Raises ValueError for a request that can never run (GrammarError for
        a constraint that does not compile), EngineClosed once the engine is closed."""
        if self._runner is None:
            raise EngineClosed("the model was unloaded")
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context length is {self.max_model_len}")
        request = Request(request_id, list(prompt_ids), params, self.tokenizer.eos_token_ids, time.monotonic())
        self._live[request_id] = LiveRequest(
            request=request,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                               params.include_stop_str_in_output),
            generator=None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed),
            matcher=None if params.grammar is None else self.grammar.matcher(params.grammar),
            logit_bias=BiasTensors.of(params.logit_bias) if params.logit_bias else None,
        )
        self._scheduler.add(request)

    def _forced_ids(self, request: Request, wanted: int) -> list[int]:
        """Up to `wanted` of the tokenizer's tokens for the text `request`'s grammar forces next, as
        it stands after the request's tokens so far ([] where the grammar leaves a choice): drafts
        (speculation.py). A long forced text (a schema's `const`) is cut before it is tokenized:
        a step's few drafts need only its start."""
        matcher = self._live[request.request_id].matcher
        if matcher is None or matcher.is_terminated():
            return []
        text = matcher.find_jump_forward_string()[:FORCED_CHARS_PER_TOKEN * wanted]
        return self.tokenizer.encode_plain(text, add_special_tokens=False)[:wanted] if text else []

    def abort_request(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is not None:
            self._scheduler.finish(live.request, FinishReason.ABORT)

    def step(self) -> EngineStep:
        """Run one batch through the model. If the model fails, every request in the batch
        finishes with an error output and the engine stays usable."""
        started = time.perf_counter()
        if self._draft is not None:
            self._draft.step_started()
        scheduled = self._scheduler.schedule()
        if scheduled.is_empty:
            return EngineStep([], None)
        try:
            sampled = self._runner.execute(scheduled, self._live)
        except Exception as exc:
            log.exception("engine step failed")
            return EngineStep(self._fail_each([seq.request for seq in scheduled.seqs], exc), None)
        known = {seq.request.request_id: len(seq.request.output_ids) for seq in scheduled.seqs}
        self._scheduler.update(scheduled, sampled.token_ids, sampled.accepted)
        failed = self._fail_sampling_errors(sampled.errors) + self._fail_unsatisfiable(sampled.unsatisfiable)
        self._finish_complete_grammars(sampled.grammar_finished)
        outputs = self._emit(scheduled, sampled, known)
        self.num_draft_tokens += sampled.num_draft_tokens
        self.num_accepted_tokens += sampled.num_accepted_tokens
        seconds = time.perf_counter() - started
        num_tokens = sum(len(out.new_token_ids) for out in outputs)  # the tokens the step gave
        self._scheduler.step_done(scheduled, num_tokens, seconds)  # timed for its cost and pacers
        if self._draft is not None:
            decodes = sum(seq.runs_as_decode_rows for seq in scheduled.seqs)
            self._draft.step_done(decodes, num_tokens, seconds, prefill=decodes < len(scheduled.seqs))
        return EngineStep(failed + outputs, self._stats(scheduled, seconds))

    def fail_all(self, exc: Exception) -> list[RequestOutput]:
        """Finish every live request with an error output (after an unexpected failure)."""
        return self._fail_each([live.request for live in self._live.values()], exc)

    def close(self, why: str = "the model was unloaded") -> list[RequestOutput]:
        """Abort every live request (an ABORT output each, with `why`) and let go of the model and
        the KV cache: their memory is freed once no one else holds them. Later requests raise
        EngineClosed."""
        outputs = []
        for live in list(self._live.values()):
            self.abort_request(live.request.request_id)
            outputs.append(RequestOutput(live.request.request_id, [], finish_reason=FinishReason.ABORT,
                                         num_prompt_tokens=len(live.request.prompt_ids), error=why))
        self._runner = None
        self.model = None
        self.grammar.close()
        if self._draft is not None:
            self._draft.close()
        return outputs

    @property
    def draft_model(self):
        """The draft model's decoder (draft_model.py), or None."""
        return None if self._draft is None else self._draft.engine.model

    @property
    def closed(self) -> bool:
        return self._runner is None

    def save_prefix(self, token_ids: list[int], path: Path) -> int:
        """Write the KV of the longest run of `token_ids`' full blocks that the prefix cache holds to
        `path` (lmserve/cache/kv_file.py), replacing it atomically. Returns the tokens saved, a
        multiple of the block size. With nothing cached it still writes a valid file covering 0
        tokens, so `path` never keeps an older save. ValueError when the model's checkpoint is not
        on disk to fingerprint; OSError when the file cannot be written."""
        identity = self._saved_prefix_identity()
        blocks = self._pool.cached_run(hash_full_blocks(list(token_ids), self._block_size))
        saved_ids = list(token_ids[: len(blocks) * self._block_size])
        write_kv_file(Path(path), identity, saved_ids, self._runner.read_blocks(blocks))
        return len(saved_ids)

    def restore_prefix(self, path: Path) -> int:
        """Put the blocks saved in `path` back into the prefix cache, so a request whose prompt
        starts with their tokens finds them cached (num_cached_tokens) and runs only the rest.
        The restored blocks are free and evictable like any cached block. Blocks already cached
        are kept; the rest take free blocks, evicting other cached content least recently used
        first but never a block a request holds. When fewer are free than the file has, the
        leading blocks that fit are restored. Returns the file's tokens the cache now holds from
        its start. ValueError, before the cache changes, for a file of another model or KV
        layout (naming what differs), a damaged one, or with prefix caching off; FileNotFoundError
        when there is no file."""
        identity = self._saved_prefix_identity()
        if not self._pool.enable_prefix_caching:
            raise ValueError("prefix caching is off (--no-prefix-caching): a restored prefix could not be found")
        with open_kv_file(Path(path)) as file:
            file.check(identity)
            file.verify()
            return self._restore_blocks(file, hash_full_blocks(file.token_ids, self._block_size))

    def forget_prefix(self, token_ids: list[int]) -> int:
        """Drop the cached content of `token_ids`' full blocks from the prefix cache; blocks a
        running request holds keep theirs (they are shared, and freed when it finishes). This
        takes blocks other cached prompts share with `token_ids` too (a common system prompt), and
        the draft model's cached blocks of them. Returns the tokens forgotten (the model's)."""
        if self.closed:
            raise EngineClosed("the model was unloaded")
        if self._draft is not None:
            self._draft.engine.forget_prefix(token_ids)
        return self._pool.uncache(hash_full_blocks(list(token_ids), self._block_size)) * self._block_size

    def _saved_prefix_identity(self) -> KVFileIdentity:
        if self.closed:
            raise EngineClosed("the model was unloaded")
        if self._kv_identity is None:
            raise ValueError(f"the model path {self.config.model_path!r} is not on disk, so a saved prefix "
                             "could not be tied to its weights")
        return self._kv_identity

    def _restore_blocks(self, file: KVFile, hashes: list[BlockHash]) -> int:
        """Hold the blocks of `hashes` already cached (so allocating cannot evict them), copy the
        file's blocks into fresh ones after them, register those, then free them all."""
        held = self._pool.cached_run(hashes)
        self._pool.hold(held)
        fresh = self._pool.allocate(min(len(hashes) - len(held), self._pool.num_free))
        try:
            for layer, (keys, values) in enumerate(file.layers(len(held), len(fresh))):
                self._runner.write_blocks(layer, fresh, keys, values)
            for block, block_hash in zip(fresh, hashes[len(held):]):
                self._pool.register(block, block_hash)
        finally:
            self._pool.release(held + fresh)
        return (len(held) + len(fresh)) * self._block_size

    def _fail_each(self, requests: list[Request], exc: Exception) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            outputs.append(self._fail(request, exc))
        return outputs

    def _fail_sampling_errors(self, errors: dict[str, str]) -> list[RequestOutput]:
        outputs = []
        for rid, why in errors.items():
            outputs.append(self._fail(self._live[rid].request, ValueError(why)))
        return outputs

    def _fail_unsatisfiable(self, reasons: dict[str, str]) -> list[RequestOutput]:
        """A request whose constraint allows no token ends as the client's error, not the engine's."""
        return [self._fail(self._live[rid].request, why, FinishReason.UNSATISFIABLE) for rid, why in reasons.items()]

    def _finish_complete_grammars(self, request_ids: set[str]) -> None:
        """A complete grammar lets nothing follow (under ignore_eos the model would go on)."""
        for rid in request_ids:
            live = self._live.get(rid)
            if live is not None and not live.request.is_finished:
                self._scheduler.finish(live.request, FinishReason.STOP)

    def _emit(self, scheduled: SchedulerOutput, sampled: StepResult, known: dict[str, int]) -> list[RequestOutput]:
        """An output for each sequence that sampled a token this step, in batch order; `known` is
        how many output tokens each had before the step."""
        outputs = []
        for seq in scheduled.seqs:
            live = self._live.get(seq.request.request_id)
            if live is not None and seq.request.request_id in sampled.token_ids:
                outputs.append(self._output(live, sampled, known[seq.request.request_id]))
        return outputs

    def _fail(self, request: Request, exc: Exception | str, reason: FinishReason = FinishReason.ERROR) -> RequestOutput:
        self._scheduler.finish(request, reason)
        self._live.pop(request.request_id, None)
        why = f"engine error: {exc}" if reason == FinishReason.ERROR else str(exc)
        return RequestOutput(request.request_id, [], finish_reason=reason,
                             num_prompt_tokens=len(request.prompt_ids), error=why)

    def _output(self, live: LiveRequest, sampled: StepResult, known: int) -> RequestOutput:
        """The step's tokens of one request (one, or more when drafts were kept), detokenized a token
        at a time so that a stop string ends the output at the token that completes it."""
        request = live.request
        logprobs = sampled.logprobs.get(request.request_id)
        is_stop_token = request.finish_reason == FinishReason.STOP  # eos / stop id: not part of the text
        new_ids = request.output_ids[known:len(request.output_ids) - is_stop_token]
        delta, stopped = "", False
        for count, token_id in enumerate(new_ids, 1):
            piece, stopped = live.detokenizer.add([token_id])
            delta += piece
            if stopped:
                del request.output_ids[known + count:]  # what followed the stop string was never output
                new_ids = new_ids[:count]
                break
        if stopped:
            self._scheduler.finish(request, FinishReason.STOP)
        if request.is_finished and not stopped:
            delta += live.detokenizer.flush()
        if request.is_finished:
            del self._live[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            text_delta=delta,
            new_logprobs=[logprobs] if logprobs is not None and new_ids else None,
            finish_reason=request.finish_reason,
            num_prompt_tokens=len(request.prompt_ids),
            num_cached_tokens=request.num_cached_prompt_tokens,
            stop_string=live.detokenizer.stop_string if stopped else None,
        )

    def _stats(self, scheduled: SchedulerOutput, seconds: float) -> StepStats:
        return StepStats(
            num_scheduled_tokens=scheduled.num_tokens,
            num_running=len(self._scheduler.running),
            num_waiting=len(self._scheduler.waiting),
            num_preempted=scheduled.num_preempted,
            kv_cache_usage=self._pool.usage,
            step_seconds=seconds,
            num_prefix_cache_queries=self._pool.num_queries,
            num_prefix_cache_hits=self._pool.num_hits,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            prompt_bounded=scheduled.prompt_bounded,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Convenience for tests and offline use: run prompts to completion, return token ids."""
        ids = [f"offline-{i}-{time.monotonic_ns()}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self._live for rid in ids):
            for output in self.step().outputs:
                if output.request_id in tokens:
                    tokens[output.request_id].extend(output.new_token_ids)
        return [tokens[rid] for rid in ids]
