"""A fake AsyncEngine for the server's tests, and the byte-level tokenizer it speaks."""

from __future__ import annotations

import asyncio
import re

from lmserve.config import EngineConfig, SchedulerConfig
from lmserve.engine.step_types import EngineLoad, EngineStep, StepStats
from lmserve.request import FinishReason, RequestOutput, SampleLogprobs, SamplingParams, TokenLogprob
from lmserve.text.chat_template import ChatTemplateError
from lmserve.text.fim import FimTokens
from lmserve.text.special_text import special_texts as special_texts_of


class ByteTokenizer:
    """Token id = byte value + 2; 0 is <s>, 1 is </s>. Multi-byte characters span tokens.

    A lmserve.text.tokenizer.ChatTokenizer. Chat renders as "role: content" lines, then
    "assistant: " and `prompt_suffix` (a template that opens <think> adds "<think>\\n"). Its
    `chat_template` is only read, as the server reads it (tool format, reasoning), never rendered.
    """

    vocab_size = 258
    eos_token_ids = (1,)
    bos_token, eos_token = "<s>", "</s>"
    fim = FimTokens()  # none: FIM is tested with FimByteTokenizer

    def __init__(self, chat_template: str | None = None, prompt_suffix: str = ""):
        self.chat_template = chat_template  # None: no template of its own, so no tools and no reasoning
        self.prompt_suffix = prompt_suffix

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + self.encode_prompt(text)

    special_texts = ("<s>", "</s>")  # encode parses them: "<s>" in a text is id 0
    special_text_set = special_texts_of(special_texts)

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [b + 2 for b in text.encode()]

    def encode_prompt(self, text: str, plain_spans=()) -> list[int]:
        """Special-token text outside `plain_spans` is its id; the rest is bytes."""
        ids: list[int] = []
        end = 0
        for found in re.finditer("</s>|<s>", text):
            if not any(start < found.end() and found.start() < stop for start, stop in plain_spans):
                ids += self.encode_plain(text[end : found.start()], add_special_tokens=False)
                ids.append(1 if found.group() == "</s>" else 0)
                end = found.end()
        return ids + self.encode_plain(text[end:], add_special_tokens=False)

    def min_num_tokens(self, data: bytes) -> int:
        return -(-len(data) // 4)  # a token per byte, or "</s>"

    def token_bytes(self, token_id: int) -> bytes:
        return [b"<s>", b"</s>"][token_id] if token_id < 2 else bytes([token_id - 2])

    def is_special(self, token_id: int) -> bool:
        return token_id < 2

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        pieces = [self.token_bytes(i) for i in ids if not (skip_special_tokens and self.is_special(i))]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **variables) -> str:
        """Extra template variables render as "name=value" lines first."""
        if any(m["role"] == "function" for m in messages):
            raise ChatTemplateError("this template has no function role")
        text = "".join(f"{name}={value}\n" for name, value in variables.items())
        text += "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant: " + self.prompt_suffix if add_generation_prompt else "")


class FimByteTokenizer(ByteTokenizer):
    """A ByteTokenizer whose ids 258, 259 and 260 are <PRE>, <SUF> and <MID>."""

    vocab_size = 261
    fim = FimTokens(prefix=258, suffix=259, middle=260)

    def token_bytes(self, token_id: int) -> bytes:
        return [b"<PRE>", b"<SUF>", b"<MID>"][token_id - 258] if token_id >= 258 else super().token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        return token_id < 2 or token_id >= 258


class FakeEngine:
    """Replies `reply` one token per output (UTF-8 safe deltas), logprobs when asked.

    `hang_after` tokens it blocks forever; `fail_after` tokens it finishes with `fail_reason` (ERROR);
    `raise_after` tokens it raises; while `hold` (an asyncio.Event) is given and not set, requests
    wait before their first token. Records calls, and requests closed before finishing.
    """

    def __init__(self, reply="Hé!", max_model_len=64, hang_after=None, fail_after=None, raise_after=None,
                 tokenizer: ByteTokenizer | None = None, grammar=None, fail_reason=FinishReason.ERROR,
                 max_num_seqs=4, hold=None):
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.config = EngineConfig("/models/fake.gguf", "fake", scheduler=SchedulerConfig(max_num_seqs=max_num_seqs))
        self.max_model_len = max_model_len
        self.model = self.draft_model = None  # no weights
        self.kv_block_bytes = 1 << 20
        self.grammar = grammar  # None: no constrained decoding (tested against the real engine)
        self.reply = reply
        self.hang_after, self.fail_after, self.raise_after = hang_after, fail_after, raise_after
        self.fail_reason = fail_reason
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.closed_early: list[str] = []
        self.closed = False  # unloaded
        self.hanging = asyncio.Event()
        self.hold = hold

    def abort(self, request_id: str) -> None:
        self.closed_early.append(request_id)

    async def drain(self, timeout=None) -> bool:
        return True

    def close(self, why: str = "the model was unloaded") -> None:
        self.closed = True

    def snapshot(self) -> dict[str, int]:
        return {"num_running": 0, "num_waiting": 0, "num_kv_blocks": 8, "num_free_kv_blocks": 8}

    # Saved prefixes: the file holds the token ids, "cached" is what a restore brought back.
    async def save_prefix(self, token_ids, path) -> int:
        path.write_text(" ".join(map(str, token_ids)))
        return len(token_ids)

    async def restore_prefix(self, path) -> int:
        text = path.read_text()
        if not text.replace(" ", "").isdigit():
            raise ValueError("not a saved prefix")
        self.restored = [int(t) for t in text.split()]
        return len(self.restored)

    async def forget_prefix(self, token_ids) -> int:
        self.forgotten = list(token_ids)
        return len(token_ids)

    async def generate(self, request_id, prompt_ids, params):
        self.calls.append((request_id, list(prompt_ids), params))
        finished = False
        try:
            async for output in self._outputs(request_id, prompt_ids, params):
                finished = output.finish_reason is not None
                yield output
        finally:
            if not finished:
                self.closed_early.append(request_id)

    async def _outputs(self, request_id, prompt_ids, params):
        reply_ids = self.tokenizer.encode(self.reply, add_special_tokens=False)
        ids = reply_ids[: params.max_tokens]
        finish = FinishReason.STOP if len(reply_ids) <= params.max_tokens else FinishReason.LENGTH
        emitted = ""
        if self.hold is not None:
            await self.hold.wait()
        for k, token_id in enumerate(ids):
            await self._maybe_misbehave(k)
            if k == self.fail_after:
                yield RequestOutput(
                    request_id, [], finish_reason=self.fail_reason, error="device fell over"
                )
                return
            last = k == len(ids) - 1
            text = self.tokenizer.decode(ids[: k + 1])
            delta = "" if text.endswith("\ufffd") and not last else text[len(emitted) :]
            emitted += delta
            logprobs = self._logprobs(token_id, params)
            yield RequestOutput(
                request_id, [token_id], delta, logprobs, finish if last else None, len(prompt_ids), 3
            )
            await asyncio.sleep(0)

    async def _maybe_misbehave(self, k):
        if k == self.hang_after:
            self.hanging.set()
            await asyncio.Event().wait()
        if k == self.raise_after:
            raise RuntimeError("kaboom")

    @staticmethod
    def _logprobs(token_id, params):
        if params.logprobs is None:
            return None
        top = [
            TokenLogprob(token_id, -0.25),
            TokenLogprob(2 + ord("x"), -2.0),
            TokenLogprob(2 + ord("y"), float("-inf")),
        ]
        return [SampleLogprobs(TokenLogprob(token_id, -0.25), top[: params.logprobs])]


class CountingEngine:
    """A stand-in LLMEngine for AsyncEngine's tests: each request gets one token per step (1, 2,
    3, ...) and finishes after `length` of them. `idle_steps` steps schedule nothing first; while
    `gate` (a threading.Event) is given and not set, steps make no progress."""

    config = tokenizer = grammar = model = draft_model = None
    max_model_len = 16
    kv_block_bytes = 0

    def __init__(self, length: int = 3, gate=None):
        self.length = length
        self.gate = gate
        self.live: dict[str, int] = {}
        self.idle_steps = 0
        self.closed = False

    @property
    def has_unfinished(self):
        return bool(self.live)

    def load(self) -> EngineLoad:
        return EngineLoad(num_running=len(self.live), num_waiting=0, num_kv_blocks=8, num_free_kv_blocks=8)

    def add_request(self, request_id, prompt_ids, params):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        self.live[request_id] = 0

    def abort_request(self, request_id):
        self.live.pop(request_id, None)

    def step(self) -> EngineStep:
        if self.idle_steps:  # a step that schedules nothing records no stats
            self.idle_steps -= 1
            return EngineStep([], None)
        if self.gate is not None and not self.gate.wait(0.005):
            return EngineStep([], None)
        outputs = []
        for rid in list(self.live):
            self.live[rid] += 1
            done = self.live[rid] == self.length
            outputs.append(RequestOutput(rid, [self.live[rid]], finish_reason=FinishReason.LENGTH if done else None,
                                         num_prompt_tokens=2))
            if done:
                del self.live[rid]
        return EngineStep(outputs, StepStats(num_scheduled_tokens=len(outputs)))

    def fail_all(self, exc):
        return []

    def forget_prefix(self, token_ids) -> int:
        """Claims every token forgotten; refuses an empty list, as a ValueError for the caller."""
        if not token_ids:
            raise ValueError("nothing to forget")
        return len(token_ids)

    def close(self, why: str) -> list[RequestOutput]:
        outputs = [RequestOutput(rid, [], finish_reason=FinishReason.ABORT, error=why) for rid in self.live]
        self.live.clear()
        self.closed = True
        return outputs


class Recorder:
    """An engine observer (async_engine.EngineObserver) that records what it is told."""

    def __init__(self):
        self.events = []

    def request_added(self, request_id, now):
        self.events.append(("added", request_id))

    def request_aborted(self, request_id):
        self.events.append(("aborted", request_id))

    def step_done(self, stats, outputs, now):
        self.events.append(("step", None if stats is None else stats.num_scheduled_tokens,
                            [(o.request_id, o.new_token_ids) for o in outputs]))

