"""SSE parsing against streams recorded from lmserve and llama.cpp's llama-server (trimmed)."""

from bench.client import RequestResult, _take_chunk
from bench.sse import SSEDecoder, StreamChunk, parse_chunk

LMSERVE_STREAM = (
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}],"usage":null}\n'
    "\n"
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" cat","logprobs":null,"finish_reason":null}],"usage":null}\n'
    "\n"
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}],"usage":null}\n'
    "\n"
    'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}\n'
    "\n"
    "data: [DONE]\n"
    "\n"
)

# llama-server (llama-cpp-python 0.3.36's llama.cpp): chunks as recorded from two requests, spliced
# into one stream (model path shortened, timings trimmed, counts made consistent). One chunk per token,
# even one with empty text (recorded for an EOS token); usage (sent whether or not include_usage was
# asked) and timings ride on the finish chunk.
_LLAMA_CHUNK = 'data: {"choices":[{"text":%s,"index":0,"logprobs":null,"finish_reason":null}],"created":1795311287,'
_LLAMA_META = '"model":"SmolLM2.gguf","system_fingerprint":"b1-0c1e570","object":"text_completion"'
LLAMA_STREAM = "".join(
    [_LLAMA_CHUNK % text + _LLAMA_META + ',"id":"chatcmpl-crT0"}\n\n' for text in ('"ter"', '"ite"', '""', '","')]
    + ['data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1795311287,'
       + _LLAMA_META + ',"usage":{"completion_tokens":4,"prompt_tokens":3,"total_tokens":7,'
       '"prompt_tokens_details":{"cached_tokens":2}},"id":"chatcmpl-crT0","timings":{"cache_n":2,"prompt_n":1,'
       '"prompt_ms":189.751,"predicted_n":4,"predicted_ms":228.699,"predicted_per_second":8.745119130385353}}\n\n',
       ": keep-alive\n\n", "data: [DONE]\n\n"]
)


def decode(stream: str) -> list[str]:
    decoder = SSEDecoder()
    payloads = [decoder.feed(line) for line in stream.split("\n")]
    return [payload for payload in payloads if payload is not None]


def replay(stream: str) -> RequestResult:
    """Feed a recorded stream through the client's chunk handling, one 'second' per event."""
    result = RequestResult()
    for tick, payload in enumerate(decode(stream), start=1):
        if not _take_chunk(payload, float(tick), result):
            break
    return result


def test_decoder_splits_events_and_skips_comments():
    assert decode("data: a\n\n: ping\n\ndata: b\ndata: c\n\n") == ["a", "b\nc"]
    decoder = SSEDecoder()
    assert decoder.feed("data:x") is None and decoder.flush() == "x"  # no space after the colon; no final blank line


def test_lmserve_stream():
    chunks = [parse_chunk(p) for p in decode(LMSERVE_STREAM)]
    assert [c.text for c in chunks] == [" the", " cat", "", "", ""]
    assert chunks[3].usage["completion_tokens"] == 2 and not chunks[3].has_choices
    assert chunks[-1] == StreamChunk(done=True)
    result = replay(LMSERVE_STREAM)
    assert (result.ttft_s, result.chunk_times_s) == (1.0, [1.0, 2.0])
    assert (result.output_tokens, result.prompt_tokens, result.cached_tokens) == (2, 5, 0)


def test_llama_cpp_stream_counts_tokens_from_usage_not_chunks():
    chunks = [parse_chunk(p) for p in decode(LLAMA_STREAM)]
    assert [c.text for c in chunks] == ["ter", "ite", "", ",", "", ""]
    assert chunks[2].has_choices and chunks[4].usage["completion_tokens"] == 4 and chunks[5].done
    result = replay(LLAMA_STREAM)
    assert result.ok and result.ttft_s == 1.0
    assert result.chunk_times_s == [1.0, 2.0, 4.0]  # the empty-text token chunk is no content chunk
    assert (result.output_tokens, result.prompt_tokens, result.cached_tokens) == (4, 3, 2)


def test_without_usage_tokens_are_counted_as_content_chunks():
    result = replay("\n".join(line for line in LMSERVE_STREAM.split("\n") if '"usage":{' not in line))
    assert result.usage is None and result.output_tokens == 2


def test_chat_deltas_and_errors():
    assert parse_chunk('{"choices":[{"index":0,"delta":{"content":"hi"}}]}').text == "hi"
    assert parse_chunk('{"error":{"message":"boom","type":"server_error"}}').error == "boom"
    assert parse_chunk("not json").error.startswith("not JSON")
    result = replay('data: {"choices":[{"text":"a"}]}\n\ndata: {"error":{"message":"engine died"}}\n\ndata: {"choices":[{"text":"b"}]}\n\n')
    assert result.error == "engine died" and result.chunk_times_s == [1.0]
