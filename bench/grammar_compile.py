"""What grammar compiles cost at real sizes and at the limits (lmserve/sampling/constraint_limits.py),
and what the worker processes cost.

    .venv/bin/python -m bench.grammar_compile [--hostile]   (--hostile: only the worker figures)

Each input is compiled once through GrammarCompiler (limit checks, a worker process, the compiled
grammar sent back and deserialized) with a fresh cache; the limits are raised for the inputs
that sit at them, so the figure is the compile's. Run it on a quiet machine.
"""

from __future__ import annotations

import json
import string
import sys
import threading
import time

import psutil

from lmserve.cli import default_model_path
from lmserve.request import GrammarSpec
from lmserve.sampling.compile_pool import CompileAbandoned
from lmserve.sampling.constraint_limits import GrammarLimits
from lmserve.sampling.grammar import GrammarCompiler, GrammarError, choice_spec
from lmserve.text.tokenizer import Tokenizer
from lmserve.weights.gguf import GGUFFile

LIMITS = GrammarLimits()
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}


def tool_tag(num_tools: int) -> str:
    params = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                               "days": {"type": "integer"}}, "required": ["city"]}
    tags = [{"type": "tag", "begin": f'<tool_call>{{"name": "f{i}", "arguments": ', "end": "}</tool_call>",
             "content": {"type": "json_schema", "json_schema": params}} for i in range(num_tools)]
    return json.dumps({"type": "structural_tag",
                       "format": {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags}})


def wide_schema(num_bytes: int, required: bool = True) -> str:
    """An object with as many string properties as fit in `num_bytes`, all required or all optional."""
    properties: dict = {}
    while len(json.dumps(properties)) * (2 if required else 1) < num_bytes - 200:
        properties[f"field_{len(properties)}"] = {"type": "string"}
    return json.dumps({"type": "object", "properties": properties, "required": list(properties) if required else []})


def words(count: int, length: int) -> list[str]:
    letters = string.ascii_lowercase
    return ["".join(letters[(i * 7 + j * 3 + i // 26) % 26] for j in range(length)) + str(i) for i in range(count)]


def gbnf(num_rules: int) -> str:
    rules = [f'r{i} ::= "item{i}" | r{i + 1}' for i in range(num_rules - 2)]
    return "\n".join(["root ::= r0", *rules, f'r{num_rules - 2} ::= "end"'])


CASES = [
    ("real: a person schema", GrammarSpec("json_schema", json.dumps(PERSON))),
    ("real: 20 tools, structural tag", GrammarSpec("structural_tag", tool_tag(20))),
    ("real: choice of 200 labels", choice_spec([f"category {w}" for w in words(200, 8)])),
    ("real: regex, ISO date", GrammarSpec("regex", r"\d{4}-\d{2}-\d{2}")),
    ("real: 100 optional properties", GrammarSpec("json_schema", wide_schema(3_300, required=False))),
    ("limit: schema 256 KiB, ~5k required properties", GrammarSpec("json_schema", wide_schema(LIMITS.max_schema_bytes))),
    ("within limits, slow: 800 optional properties", GrammarSpec("json_schema", wide_schema(26_000, required=False))),
    ("limit: 256 tools (max_structural_tags)", GrammarSpec("structural_tag", tool_tag(LIMITS.max_structural_tags))),
    ("limit: choice 2,048 x 15 chars", choice_spec(words(2_048, 11))),
    ("limit: choice 32 KiB as 320 x 100 chars", choice_spec(words(320, 100))),
    ("limit: regex 16 KiB alternation", GrammarSpec("regex", "|".join(words(1_600, 8))[: LIMITS.max_regex_chars])),
    ("limit: GBNF 1,024 rules", GrammarSpec("ebnf", gbnf(LIMITS.max_grammar_rules))),
    ("within limits, slow: maxLength 2,000", GrammarSpec("json_schema", '{"type": "string", "maxLength": 2000}')),
]


def main() -> None:
    tokenizer = Tokenizer.from_gguf(GGUFFile.open(default_model_path()))
    raised = GrammarLimits(max_schema_bytes=2**30, max_schema_nodes=2**30, max_choices=2**30,
                           max_choice_chars=2**30, max_regex_chars=2**30, max_grammar_bytes=2**30,
                           max_grammar_rules=2**30, max_structural_tags=2**30, compile_timeout_s=60)
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, limits=raised)
    started = time.perf_counter()
    compiler.compile(GrammarSpec("regex", "x"))
    print(f"first compile (forkserver start, xgrammar import, vocabulary): {time.perf_counter() - started:.2f} s")
    for name, spec in CASES:
        compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, limits=raised)
        compiler.compile(GrammarSpec("regex", "x"))  # the worker is up
        started = time.perf_counter()
        try:
            compiled = compiler.compile(spec)
        except GrammarError as exc:
            print(f"{name}: {len(spec.text.encode()) / 1024:.1f} KiB in, refused after "
                  f"{time.perf_counter() - started:.1f} s ({exc})")
        else:
            print(f"{name}: {len(spec.text.encode()) / 1024:.1f} KiB in, {time.perf_counter() - started:.3f} s, "
                  f"{compiled.memory_size_bytes / 2**20:.2f} MiB compiled")
        compiler.close()
    hostile(tokenizer)


def hostile(tokenizer: Tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    spec = GrammarSpec("json_schema", wide_schema(50_000, required=False))  # 1,500+ optional properties
    compiler.compile(GrammarSpec("regex", "x"))
    workers = [p for p in psutil.Process().children(recursive=True) if "lmserve-grammar" in " ".join(p.cmdline())
               or p.name().startswith("python")]
    for process in workers:
        info = process.memory_full_info()
        print(f"process {process.pid} {' '.join(process.cmdline())[-60:]}: RSS {info.rss / 2**20:.0f} MiB, "
              f"USS {info.uss / 2**20:.0f} MiB")
    started = time.perf_counter()
    try:
        compiler.compile(spec)
    except GrammarError as exc:
        print(f"hostile (1,500+ optional properties): refused after {time.perf_counter() - started:.2f} s ({exc})")
    abandoned = threading.Event()
    threading.Timer(0.5, abandoned.set).start()
    started = time.perf_counter()
    try:
        compiler.compile(spec, abandoned)
    except CompileAbandoned:
        print(f"hostile compile abandoned at 0.5 s: stopped after {time.perf_counter() - started:.2f} s")
    compiler.close()  # no idle worker left: the next compile starts one
    started = time.perf_counter()
    compiler.compile(GrammarSpec("json_schema", json.dumps(PERSON)))
    print(f"next compile, on a newly forked worker: {time.perf_counter() - started:.3f} s")
    compiler.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--hostile"]:
        hostile(Tokenizer.from_gguf(GGUFFile.open(default_model_path())))
    else:
        main()
