"""Benchmark harness: drive OpenAI-compatible servers with streaming completions and compare them.

`python -m bench run` measures one running server; `python -m bench compare` starts lmserve and
llama.cpp's llama-server in turn on the same GGUF and prints a side-by-side table. The pure parts
(statistics, SSE parsing, prompts, workloads, reports) import nothing heavier than the stdlib, so
their unit tests run with the test extras alone.
"""
