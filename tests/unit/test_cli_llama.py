"""llama-server's flags on `lmserve serve`: the table (lmserve/llama_flag_table.py) against
llama-server's README and against the parser, both ways, and what the honoured ones set."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmserve import cli, serve_settings
from lmserve.cli import build_parser, default_model_path
from lmserve.config import DraftConfig, EngineConfig
from lmserve.fleet.models import engine_config_for
from lmserve.llama_flag_table import LLAMA_SERVER_FLAGS
from lmserve.text.builtin_templates import BUILTIN_TEMPLATES

# Every spelling of every flag in llama-server's README tables (Common, Sampling and
# Server-specific params) at llama.cpp 0c1e570, one README row a line.
README_FLAGS = [
    "-h", "--help", "--usage",
    "--version",
    "-cl", "--cache-list",
    "--completion-bash",
    "-t", "--threads",
    "-tb", "--threads-batch",
    "-C", "--cpu-mask",
    "-Cr", "--cpu-range",
    "--cpu-strict",
    "--prio",
    "--poll",
    "-Cb", "--cpu-mask-batch",
    "-Crb", "--cpu-range-batch",
    "--cpu-strict-batch",
    "--prio-batch",
    "--poll-batch",
    "-c", "--ctx-size",
    "-n", "--predict", "--n-predict",
    "-b", "--batch-size",
    "-ub", "--ubatch-size",
    "--keep",
    "--swa-full",
    "-fa", "--flash-attn",
    "--perf", "--no-perf",
    "-e", "--escape", "--no-escape",
    "--rope-scaling",
    "--rope-scale",
    "--rope-freq-base",
    "--rope-freq-scale",
    "--yarn-orig-ctx",
    "--yarn-ext-factor",
    "--yarn-attn-factor",
    "--yarn-beta-slow",
    "--yarn-beta-fast",
    "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload",
    "--repack", "-nr", "--no-repack",
    "--no-host",
    "-ctk", "--cache-type-k",
    "-ctv", "--cache-type-v",
    "-dt", "--defrag-thold",
    "--rpc",
    "-lm", "--load-mode",
    "-lzm", "--lazy-mode",
    "--numa",
    "-dev", "--device",
    "--list-devices",
    "-ot", "--override-tensor",
    "-cmoe", "--cpu-moe",
    "-ncmoe", "--n-cpu-moe",
    "-ncffn", "--n-cpu-ffn",
    "-ngl", "--gpu-layers", "--n-gpu-layers",
    "-sm", "--split-mode",
    "-ts", "--tensor-split",
    "-mg", "--main-gpu",
    "-fit", "--fit",
    "-fitt", "--fit-target",
    "-fitc", "--fit-ctx",
    "--check-tensors",
    "--override-kv",
    "--op-offload", "--no-op-offload",
    "--lora",
    "--lora-scaled",
    "--control-vector",
    "--control-vector-scaled",
    "--control-vector-layer-range",
    "-m", "--model",
    "-mu", "--model-url",
    "-dr", "--docker-repo",
    "-hf", "-hfr", "--hf-repo",
    "-hff", "--hf-file",
    "-hft", "--hf-token",
    "--log-disable",
    "--log-file",
    "--log-jsonl", "--no-log-jsonl",
    "--log-colors",
    "-v", "--verbose", "--log-verbose",
    "--offline",
    "-lv", "--verbosity", "--log-verbosity",
    "--log-prefix", "--no-log-prefix",
    "--log-timestamps", "--no-log-timestamps",
    "--spec-draft-type-k", "-ctkd", "--cache-type-k-draft",
    "--spec-draft-type-v", "-ctvd", "--cache-type-v-draft",
    "--samplers",
    "-s", "--seed",
    "--sampler-seq", "--sampling-seq",
    "--ignore-eos",
    "--temp", "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--top-nsigma", "--top-n-sigma",
    "--xtc-probability",
    "--xtc-threshold",
    "--typical", "--typical-p",
    "--repeat-last-n",
    "--repeat-penalty",
    "--presence-penalty",
    "--frequency-penalty",
    "--dry-multiplier",
    "--dry-base",
    "--dry-allowed-length",
    "--dry-penalty-last-n",
    "--dry-sequence-breaker",
    "--adaptive-target",
    "--adaptive-decay",
    "--dynatemp-range",
    "--dynatemp-exp",
    "--mirostat",
    "--mirostat-lr",
    "--mirostat-ent",
    "-l", "--logit-bias",
    "--grammar",
    "--grammar-file",
    "-j", "--json-schema",
    "-jf", "--json-schema-file",
    "-bs", "--backend-sampling",
    "-lcs", "--lookup-cache-static",
    "-lcd", "--lookup-cache-dynamic",
    "--kv-unified-per-slot",
    "-ctxcp", "--ctx-checkpoints", "--swa-checkpoints",
    "-cms", "--checkpoint-min-step",
    "-cram", "--cache-ram",
    "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
    "--cache-idle-slots", "--no-cache-idle-slots",
    "--context-shift", "--no-context-shift",
    "-r", "--reverse-prompt",
    "-sp", "--special",
    "--warmup", "--no-warmup",
    "--spm-infill",
    "--pooling",
    "-np", "--parallel",
    "-cb", "--cont-batching", "-nocb", "--no-cont-batching",
    "-mm", "--mmproj",
    "-mmu", "--mmproj-url",
    "--mmproj-auto", "--no-mmproj", "--no-mmproj-auto",
    "--mmproj-offload", "--no-mmproj-offload",
    "-mmdev", "--mmproj-device",
    "--image-min-tokens",
    "--image-max-tokens",
    "--mtmd-batch-max-tokens",
    "--video-fps",
    "--video-timestamp-interval",
    "--video-ffmpeg-dir",
    "-a", "--alias",
    "--tags",
    "--embd-normalize",
    "--host",
    "--port",
    "--reuse-port",
    "--path",
    "--cors-origins",
    "--cors-methods",
    "--cors-headers",
    "--cors-credentials", "--no-cors-credentials",
    "--api-prefix",
    "--ui-config", "--webui-config",
    "--ui-config-file", "--webui-config-file",
    "--ui-mcp-proxy", "--webui-mcp-proxy", "--no-ui-mcp-proxy", "--no-webui-mcp-proxy",
    "--tools",
    "--tools-runtime",
    "--mcp-servers-config",
    "--mcp-servers-json",
    "-ag", "--agent", "-no-ag", "--no-agent",
    "--ui", "--webui", "--no-ui", "--no-webui",
    "--embedding", "--embeddings",
    "--rerank", "--reranking",
    "--api-key",
    "--api-key-file",
    "--ssl-key-file",
    "--ssl-cert-file",
    "--chat-template-kwargs",
    "-to", "--timeout",
    "--sse-ping-interval",
    "--threads-http",
    "--cache-prompt", "--no-cache-prompt",
    "--cache-reuse",
    "--metrics",
    "--props",
    "--slots", "--no-slots",
    "--slot-save-path",
    "--media-path",
    "--models-dir",
    "--models-preset",
    "--models-max",
    "--models-autoload", "--no-models-autoload",
    "--jinja", "--no-jinja",
    "--reasoning-format",
    "-rea", "--reasoning",
    "--reasoning-effort",
    "--reasoning-budget",
    "--reasoning-budget-message",
    "--reasoning-preserve", "--no-reasoning-preserve",
    "--chat-template",
    "--chat-template-file",
    "--skip-chat-parsing", "--no-skip-chat-parsing",
    "--prefill-assistant", "--no-prefill-assistant",
    "-sps", "--slot-prompt-similarity",
    "--lora-init-without-apply",
    "--sleep-idle-seconds",
    "--log-prompts-dir",
    "--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft",
    "--spec-draft-threads", "-td", "--threads-draft",
    "--spec-draft-threads-batch", "-tbd", "--threads-batch-draft",
    "--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft",
    "--spec-draft-cpu-range", "-Crd", "--cpu-range-draft",
    "--spec-draft-cpu-strict", "--cpu-strict-draft",
    "--spec-draft-prio", "--prio-draft",
    "--spec-draft-poll", "--poll-draft",
    "--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft",
    "--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft",
    "--spec-draft-prio-batch", "--prio-batch-draft",
    "--spec-draft-poll-batch", "--poll-batch-draft",
    "--spec-draft-override-tensor", "-otd", "--override-tensor-draft",
    "--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft",
    "--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft",
    "--spec-draft-n-max",
    "--spec-draft-n-min",
    "--spec-synth-len",
    "--spec-synth-rates",
    "--spec-draft-p-split", "--draft-p-split",
    "--spec-draft-p-min", "--draft-p-min",
    "--spec-draft-backend-sampling", "--no-spec-draft-backend-sampling",
    "--spec-draft-device", "-devd", "--device-draft",
    "--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft",
    "--spec-draft-model", "-md", "--model-draft",
    "--spec-type",
    "--spec-ngram-mod-n-min",
    "--spec-ngram-mod-n-max",
    "--spec-ngram-mod-n-match",
    "--spec-ngram-simple-size-n",
    "--spec-ngram-simple-size-m",
    "--spec-ngram-simple-min-hits",
    "--spec-ngram-map-k-size-n",
    "--spec-ngram-map-k-size-m",
    "--spec-ngram-map-k-min-hits",
    "--spec-ngram-map-k4v-size-n",
    "--spec-ngram-map-k4v-size-m",
    "--spec-ngram-map-k4v-min-hits",
    "--draft", "--draft-n", "--draft-max",
    "--draft-min", "--draft-n-min",
    "--spec-ngram-size-n",
    "--spec-ngram-size-m",
    "--spec-ngram-min-hits",
    "--embd-gemma-default",
    "--fim-qwen-1.5b-default",
    "--fim-qwen-3b-default",
    "--fim-qwen-7b-default",
    "--fim-qwen-7b-spec",
    "--fim-qwen-14b-spec",
    "--fim-qwen-30b-default",
    "--gpt-oss-20b-default",
    "--gpt-oss-120b-default",
    "--vision-gemma-4b-default",
    "--vision-gemma-12b-default",
    "--spec-default",
]


def table(kind: str) -> list[str]:
    return [name for flag in LLAMA_SERVER_FLAGS if flag.kind == kind for name in flag.spellings]


def flag_row(name: str):
    return next(flag for flag in LLAMA_SERVER_FLAGS if name in flag.spellings)


def test_the_table_has_every_flag_of_llama_servers_readme_and_no_other():
    names = [name for flag in LLAMA_SERVER_FLAGS for name in flag.spellings]
    assert len(names) == len(set(names))  # each spelling once
    assert sorted(names) == sorted(set(README_FLAGS))


@pytest.mark.parametrize("name", table("refused"))
def test_a_refused_flag_is_refused_by_name(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", name, "1", "--port", "1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"lmserve: {name} is a llama-server flag lmserve does not support: ")
    assert error.strip().endswith(flag_row(name).note)


def served(*argv: str) -> SimpleNamespace:
    """What `lmserve serve ARGV` would serve with: its settings, as serve() builds them."""
    args = build_parser().parse_args(["serve", *argv])
    engine = serve_settings.engine_config(args)
    embedding = serve_settings.embedding_config(args)
    models = serve_settings.catalogue(args, engine, embedding)
    return SimpleNamespace(args=args, engine=engine, embedding=embedding, models=models, chat=models.entries()[0],
                           state=serve_settings.state_settings(args), listen=serve_settings.listen_options(args))


def chat_engine(settings: SimpleNamespace) -> EngineConfig:
    """The engine settings the chat model gets: the server's, with its catalogue entry's on top."""
    return engine_config_for(settings.engine, settings.chat)


def comparable(settings: SimpleNamespace) -> tuple:
    return (settings.engine, settings.embedding, settings.models.entries(), settings.chat.defaults, settings.state,
            settings.listen, vars(settings.args) | {"llama_accepted": ()})


@pytest.mark.parametrize("name", table("accepted"))
def test_an_accepted_flag_changes_nothing_and_says_why(name):
    flag = flag_row(name)
    value = [(flag.values or ("99",))[0]] if flag.takes_value else []
    settings = served(name, *value)
    assert settings.args.llama_accepted == ((" ".join([name, *value]), flag.note),)
    assert comparable(settings) == comparable(served())


@pytest.mark.parametrize("argv", ["--reasoning-format none", "-fit on", "--embd-normalize 0", "-dev cuda0",
                                  "--sleep-idle-seconds 60", "--cache-reuse 256", "--log-colors on", "-rea on",
                                  "--reasoning-budget 0", "--reasoning-effort high", "--spec-ngram-simple-min-hits 2"])
def test_an_accepted_flag_with_a_value_lmserve_does_not_match_is_refused(argv, capsys):
    name, value = argv.split()
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", name, value])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error.startswith(f"lmserve: {argv} is a llama-server setting lmserve does not support: ")
    assert f"(it takes {name} {' or '.join(flag_row(name).values)})" in error


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    (tmp_path / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "keys").write_text("sk-file\n")
    (tmp_path / "template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "pem").write_text("-----BEGIN-----")
    return {"gguf": str(tmp_path / "tiny.Q8_0.gguf"), "dir": str(tmp_path), "keys": str(tmp_path / "keys"),
            "jinja": str(tmp_path / "template.jinja"), "pem": str(tmp_path / "pem")}


# Each honoured spelling (first in argv) and what it sets. --help, --usage and --version print.
HONOURED = [
    ("-t 3", lambda s: s.engine.num_threads, 3),
    ("--threads -1", lambda s: s.engine.num_threads, None),
    ("-c 2048", lambda s: (s.engine.scheduler.max_model_len, s.engine.cache.kv_cache_tokens), (2048, 2048)),
    ("--ctx-size 1024 -np 4", lambda s: (s.engine.scheduler.max_model_len, s.engine.cache.kv_cache_tokens),
     (256, 1024)),
    ("-n 128", lambda s: s.chat.defaults["max_tokens"], 128),
    ("--predict -1", lambda s: s.chat.defaults["max_tokens"], None),
    ("--n-predict 64", lambda s: s.chat.defaults["max_tokens"], 64),
    ("-ub 256", lambda s: s.engine.scheduler.max_num_batched_tokens, 256),
    ("--ubatch-size 128", lambda s: s.engine.scheduler.max_num_batched_tokens, 128),
    ("-m {gguf}", lambda s: (s.chat.id, s.chat.source, s.engine.model_path), ("tiny", "{gguf}", "{gguf}")),
    ("--model {gguf}", lambda s: s.chat.source, "{gguf}"),
    ("-mu https://example.com/m.Q4_0.gguf", lambda s: (s.chat.id, s.chat.source),
     ("m", "https://example.com/m.Q4_0.gguf")),
    ("--model-url https://example.com/m.gguf", lambda s: s.chat.source, "https://example.com/m.gguf"),
    ("-hf org/repo:Q4_K_M -hff m.gguf", lambda s: s.chat.source, "hf:org/repo/m.gguf"),
    ("-hfr org/repo -hff m.gguf", lambda s: s.chat.source, "hf:org/repo/m.gguf"),
    ("--hf-repo org/repo -hff m.gguf", lambda s: s.chat.source, "hf:org/repo/m.gguf"),
    ("-hff m.gguf -hf org/repo", lambda s: s.chat.source, "hf:org/repo/m.gguf"),
    ("--hf-file m.gguf -hf org/repo", lambda s: s.chat.source, "hf:org/repo/m.gguf"),
    ("-v", lambda s: s.args.log_level, "debug"),
    ("--verbose", lambda s: s.args.log_level, "debug"),
    ("--log-verbose", lambda s: s.args.log_level, "debug"),
    ("-lv 2", lambda s: s.args.log_level, "warning"),
    ("--verbosity 0", lambda s: s.args.log_level, "error"),
    ("--log-verbosity 5", lambda s: s.args.log_level, "debug"),
    ("-s 7", lambda s: s.chat.defaults["seed"], 7),
    ("--seed -1", lambda s: "seed" in s.chat.defaults, False),
    ("--ignore-eos", lambda s: s.chat.defaults["ignore_eos"], True),
    ("--temp 0.5", lambda s: s.chat.defaults["temperature"], 0.5),
    ("--temperature -1", lambda s: s.chat.defaults["temperature"], 0.0),
    ("--top-k 20", lambda s: s.chat.defaults["top_k"], 20),
    ("--top-p 0.9", lambda s: s.chat.defaults["top_p"], 0.9),
    ("--min-p 0.1", lambda s: s.chat.defaults["min_p"], 0.1),
    ("--top-nsigma 1.5", lambda s: s.chat.defaults["top_n_sigma"], 1.5),
    ("--top-n-sigma -1", lambda s: s.chat.defaults["top_n_sigma"], -1.0),
    ("--xtc-probability 0.5", lambda s: s.chat.defaults["xtc_probability"], 0.5),
    ("--xtc-threshold 0.2", lambda s: s.chat.defaults["xtc_threshold"], 0.2),
    ("--typical 0.9", lambda s: s.chat.defaults["typical_p"], 0.9),
    ("--typical-p 0.8", lambda s: s.chat.defaults["typical_p"], 0.8),
    ("--repeat-last-n 32", lambda s: s.chat.defaults["repeat_last_n"], 32),
    ("--repeat-penalty 1.1", lambda s: (s.chat.defaults["repeat_penalty"], "repetition_penalty" in s.chat.defaults),
     (1.1, False)),  # llama.cpp's windowed penalty, not vLLM's over the whole context
    ("--dry-multiplier 0.8", lambda s: s.chat.defaults["dry_multiplier"], 0.8),
    ("--dry-base 2", lambda s: s.chat.defaults["dry_base"], 2.0),
    ("--dry-allowed-length 3", lambda s: s.chat.defaults["dry_allowed_length"], 3),
    ("--dry-penalty-last-n 128", lambda s: s.chat.defaults["dry_penalty_last_n"], 128),
    ("--dry-sequence-breaker \\n --dry-sequence-breaker ###", lambda s: s.chat.defaults["dry_sequence_breakers"],
     ["\n", "###"]),
    ("--dynatemp-range 0.5", lambda s: s.chat.defaults["dynatemp_range"], 0.5),
    ("--dynatemp-exp 2", lambda s: s.chat.defaults["dynatemp_exponent"], 2.0),
    ("--mirostat 2", lambda s: s.chat.defaults["mirostat"], 2),
    ("--mirostat-lr 0.2", lambda s: s.chat.defaults["mirostat_eta"], 0.2),
    ("--mirostat-ent 4", lambda s: s.chat.defaults["mirostat_tau"], 4.0),
    ("--samplers penalties;top_k;temp", lambda s: s.chat.defaults["samplers"], ["penalties", "top_k", "temp"]),
    ("--sampler-seq ekmt", lambda s: s.chat.defaults["samplers"], "ekmt"),
    ("--sampling-seq kt", lambda s: s.chat.defaults["samplers"], "kt"),
    ("-e --dry-sequence-breaker \\t", lambda s: s.chat.defaults["dry_sequence_breakers"], ["\t"]),
    ("--escape --dry-sequence-breaker \\x41", lambda s: s.chat.defaults["dry_sequence_breakers"], ["A"]),
    ("--no-escape --dry-sequence-breaker \\n", lambda s: s.chat.defaults["dry_sequence_breakers"], ["\\n"]),
    ("--presence-penalty 0.5", lambda s: s.chat.defaults["presence_penalty"], 0.5),
    ("--frequency-penalty 0.25", lambda s: s.chat.defaults["frequency_penalty"], 0.25),
    ("-kvu -c 2048 -np 4", lambda s: s.engine.scheduler.max_model_len, 2048),
    ("--kv-unified -c 2048 -np 4", lambda s: s.engine.scheduler.max_model_len, 2048),
    ("-no-kvu -c 2048 -np 4", lambda s: s.engine.scheduler.max_model_len, 512),
    ("--no-kv-unified -c 2048 -np 2", lambda s: s.engine.scheduler.max_model_len, 1024),
    ("-sp", lambda s: s.chat.defaults["skip_special_tokens"], False),
    ("--special", lambda s: s.chat.defaults["skip_special_tokens"], False),
    ("--pooling last", lambda s: s.args.chat_embedding_pooling, "last"),
    ("-np 4", lambda s: s.engine.scheduler.max_num_seqs, 4),
    ("--parallel 2", lambda s: s.engine.scheduler.max_num_seqs, 2),
    ("-a mymodel", lambda s: (s.chat.id, s.chat.aliases), ("mymodel", ())),
    ("--alias zeta,alpha", lambda s: (s.chat.id, s.chat.aliases), ("alpha", ("zeta",))),
    ("--host 0.0.0.0", lambda s: s.listen["host"], "0.0.0.0"),
    ("--port 9999", lambda s: s.listen["port"], 9999),
    ("--cors-origins http://a.test,http://b.test", lambda s: s.state["allowed_origins"],
     ("http://a.test", "http://b.test")),
    ("--embedding", lambda s: (s.state["embeddings_only"], s.embedding), (True, None)),
    ("--embeddings", lambda s: (s.state["embeddings_only"], s.embedding), (True, None)),
    ("--api-key sk-1,sk-2", lambda s: s.state["api_keys"], ("sk-1", "sk-2")),
    ("--api-key-file {keys}", lambda s: s.state["api_keys"], ("sk-file",)),
    ("--ssl-key-file {pem} --ssl-cert-file {pem}", lambda s: (s.listen["ssl_keyfile"], s.listen["ssl_certfile"]),
     ("{pem}", "{pem}")),
    ("--ssl-cert-file {pem} --ssl-key-file {pem}", lambda s: "ssl_certfile" in s.listen, True),
    ("--no-cache-prompt", lambda s: s.engine.cache.enable_prefix_caching, False),
    ("--slots", lambda s: s.state["serve_slots"], True),
    ("--no-slots", lambda s: s.state["serve_slots"], False),
    ("--slot-save-path {dir}", lambda s: str(s.state["slot_save_path"]), "{dir}"),
    ("--models-dir {dir}", lambda s: str(s.models.models_dir), "{dir}"),
    ("--models-max 2", lambda s: s.args.max_loaded_models, 2),
    ("-to 90", lambda s: (s.args.read_timeout, s.args.write_timeout), (90.0, 90.0)),
    ("--timeout 90 --read-timeout 5", lambda s: (s.args.read_timeout, s.args.write_timeout), (5.0, 90.0)),
    ("--models-autoload --no-autoload --models-autoload", lambda s: s.args.no_autoload, False),
    ("--no-models-autoload", lambda s: s.args.no_autoload, True),
    ("-ctk q8_0 -ctv q8_0", lambda s: s.engine.cache.kv_cache_dtype, "int8"),
    ("--cache-type-k q8_0 --cache-type-v q8_0 --kv-cache-dtype int8", lambda s: s.engine.cache.kv_cache_dtype, "int8"),
    ("-ctv q8_0 -ctk q8_0", lambda s: s.engine.cache.kv_cache_dtype, "int8"),
    ("--cache-type-v q8_0 --cache-type-k q8_0", lambda s: s.engine.cache.kv_cache_dtype, "int8"),
    ("--spec-type ngram-simple", lambda s: s.engine.scheduler.num_speculative_tokens, 4),  # lmserve's default K
    ("--spec-type none", lambda s: s.engine.scheduler.num_speculative_tokens, 0),
    ("--spec-type none,ngram-simple --spec-ngram-simple-size-m 8", lambda s: s.engine.scheduler.num_speculative_tokens, 8),
    ("--spec-ngram-simple-size-m 6", lambda s: s.engine.scheduler.num_speculative_tokens, 6),
    ("--spec-ngram-size-m 2", lambda s: s.engine.scheduler.num_speculative_tokens, 2),
    ("-md {gguf}", lambda s: chat_engine(s).draft, DraftConfig("{gguf}")),
    ("--model-draft {gguf} --spec-type draft-simple", lambda s: chat_engine(s).draft.model_path, "{gguf}"),
    ("--spec-draft-model {gguf} --draft-dtype int4",
     lambda s: (chat_engine(s).draft.dtype, chat_engine(s).draft.tokens), ("int4", 8)),
    ("--spec-draft-n-max 6 -md {gguf}", lambda s: (chat_engine(s).draft.tokens, chat_engine(s).scheduler.num_speculative_tokens), (6, 4)),
    ("-md {gguf} --spec-type ngram-simple,draft-simple",  # the draft model, and lookup on the steps it leaves
     lambda s: (chat_engine(s).draft.tokens, chat_engine(s).scheduler.num_speculative_tokens), (8, 4)),
    ("-md {gguf} --spec-ngram-simple-size-m 0",  # only the draft model drafts
     lambda s: (chat_engine(s).draft.tokens, chat_engine(s).scheduler.num_speculative_tokens), (8, 0)),
    ("--chat-template llama3", lambda s: s.engine.chat_template, BUILTIN_TEMPLATES["llama3"]),
    ("--chat-template-file {jinja}", lambda s: s.engine.chat_template, "{{ messages[0]['content'] }}"),
]
PRINTING = ["-h", "--help", "--usage", "--version"]


def test_the_honoured_flags_tested_are_the_tables():
    assert sorted({argv.split()[0] for argv, _, _ in HONOURED} | set(PRINTING)) == sorted(table("honoured"))


@pytest.mark.parametrize("argv, setting, expected", HONOURED, ids=[argv.split()[0] for argv, _, _ in HONOURED])
def test_an_honoured_flag_sets_what_it_should(argv, setting, expected, files):
    settings = served(*argv.format(**files).split())
    if isinstance(expected, str) and "{" in expected and "{{" not in expected:
        expected = expected.format(**files)
    elif isinstance(expected, tuple):
        expected = tuple(e.format(**files) if isinstance(e, str) else e for e in expected)
    elif isinstance(expected, DraftConfig):
        expected = DraftConfig(expected.model_path.format(**files), expected.dtype)
    assert setting(settings) == expected


@pytest.mark.parametrize("name", PRINTING)
def test_help_and_version_print_and_exit(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", name])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("lmserve " if name == "--version" else "usage: lmserve serve")


# ---------------------------------------------------------------- -c and -np


@pytest.mark.parametrize("argv, max_model_len, max_num_seqs, kv_cache_tokens", [
    ("", None, 64, None),  # lmserve's own: the model's context, --kv-cache-memory
    ("-c 2048", 2048, 64, 2048),  # no -np: llama-server's slots share the whole cache (unified)
    ("-c 2048 -np 4", 512, 4, 2048),  # -np: each slot gets -c / -np
    ("-c 2048 -np 3", 682, 3, 2048),  # (llama.cpp rounds each slot up to a multiple of 256: 768)
    ("-c 2048 -np 4 -kvu", 2048, 4, 2048),
    ("-c 2048 -np -1", 2048, 64, 2048),  # -1: auto
    ("-c 2048 -no-kvu", 2048, 64, 2048),  # without -np, llama-server unifies anyway
    ("-np 4", None, 4, None),  # without -c: the model's context per request
    ("-c 0 -np 4", None, 4, None),  # 0: the model's
    ("--max-model-len 1024 --max-num-seqs 8", 1024, 8, None),
    ("-c 4096 --max-num-seqs 8", 4096, 8, 4096),
])
def test_ctx_size_and_parallel_give_llama_servers_limits(argv, max_model_len, max_num_seqs, kv_cache_tokens):
    config = serve_settings.engine_config(build_parser().parse_args(["serve", *argv.split()]))
    assert (config.scheduler.max_model_len, config.scheduler.max_num_seqs, config.cache.kv_cache_tokens) == (
        max_model_len, max_num_seqs, kv_cache_tokens)


@pytest.mark.parametrize("argv, message", [
    ("-c 2048 --max-model-len 1024", "-c and --max-model-len both set the context"),
    ("-c 2048 --kv-cache-memory 1GiB", "-c sizes the KV cache in tokens and --kv-cache-memory in bytes"),
    ("-np 4 --max-num-seqs 8", "-np is llama-server's spelling of --max-num-seqs"),
    ("-c 4 -np 4", "-c 4 leaves each of the 4 slots 1 token(s) of context"),
    ("-a a --served-model-name b", "-a and --served-model-name both name the model"),
    ("-a ,", "-a ',' names nothing"),
    ("-hf org/repo", "-hf REPO needs -hff FILE"),
    ("-hff m.gguf", "-hf REPO needs -hff FILE"),
    ("-mu http://example.com/m.gguf", "over https:// only"),
    ("--chat-template chatglm4", "'chatglm4' is not a template lmserve has; it has chatml, command-r"),
    ("--chat-template {%-if", "the chat template does not render"),
    ("--chat-template-file no-such.jinja", "cannot read --chat-template-file 'no-such.jinja'"),
    ("--chat-template chatml --chat-template-file x.jinja", "--chat-template and --chat-template-file both"),
    ("--top-p 2", "--top-p cannot be a request's default: top_p must be in (0, 1]"),
    ("--repeat-penalty 0", "--repeat-penalty cannot be a request's default: repeat_penalty: Input should be greater "
                           "than 0"),
    ("--temp nan", "--temp/--temperature cannot be a request's default: temperature: Input should be a finite number"),
    ("--typical 1.5", "--typical/--typical-p cannot be a request's default: typical_p must be in (0, 1]"),
    ("--xtc-probability 0.5 --xtc-threshold 2", "--xtc-threshold cannot be a request's default: xtc_threshold must "
                                                "be in [0, 1]"),
    ("--mirostat 3", "--mirostat cannot be a request's default: mirostat must be 0, 1 or 2"),
    ("--dry-multiplier -1", "--dry-multiplier cannot be a request's default: dry_multiplier must be > 0"),
    ("--dry-allowed-length 0", "--dry-allowed-length cannot be a request's default: dry_allowed_length must be >= 1"),
    ("--samplers top_k;nope", "--samplers/--sampler-seq cannot be a request's default: samplers: unknown sampler "
                              "'nope'"),
    ("--sampler-seq kat", "--samplers/--sampler-seq cannot be a request's default: samplers: the adaptive-p sampler "
                          "is not supported by lmserve"),
    ("--samplers top_k;temp --repeat-penalty 1.1", "--samplers/--sampler-seq cannot be a request's default: samplers "
                                                   "leaves out 'penalties' while a penalty is set"),
    # A setting of a sampler the defaults leave off still holds for a request that turns the sampler on.
    ("--dry-base 0.5", "--dry-base cannot be a request's default: dry_base must be >= 1"),
    ("--dry-multiplier 0.8 --dry-penalty-last-n 0 --dry-base 0.5", "--dry-base cannot be a request's default"),
    ("--mirostat-lr 0", "--mirostat-lr cannot be a request's default: mirostat_eta must be > 0"),
    ("--mirostat 0 --mirostat-ent -1", "--mirostat-ent cannot be a request's default: mirostat_tau must be > 0"),
    ("--xtc-threshold 2", "--xtc-threshold cannot be a request's default: xtc_threshold must be in [0, 1]"),
    ("--dynatemp-exp 0", "--dynatemp-exp cannot be a request's default: dynatemp_exponent must be > 0"),
    ("--embedding --embedding-model x", "--embedding serves MODEL for embeddings"),
    ("--cors-origins localhost", "--cors-origins localhost (llama-server's shorthand) is not taken here"),
    ("--host 127.0.0.1,::1", "lmserve listens on one address"),
    ("--ssl-key-file k.pem", "HTTPS needs both --ssl-key-file and --ssl-cert-file"),
    ("-ctk q8_0", "lmserve quantizes keys and values together"),
    ("-ctk q8_0 -ctv q8_0 --kv-cache-dtype auto", "-ctk/-ctv q8_0 asks for an int8 KV cache"),
    ("--spec-type none --speculative-ngram 8", "--spec-type none turns prompt lookup off"),
    ("--spec-type none --speculative-sampling", "--spec-type none turns prompt lookup off"),
    ("--spec-type ngram-simple --spec-ngram-simple-size-m 0", "--spec-type ngram-simple asks for prompt lookup"),
    ("--spec-type draft-simple", "--spec-type draft-simple asks for a draft model"),
    ("--spec-type ngram-simple,draft-simple", "--spec-type draft-simple asks for a draft model"),
    ("--spec-draft-n-max 6", "--draft-tokens sets the draft model's drafts: give --draft-model too"),
])
def test_settings_that_cannot_hold_stop_start_up_with_the_reason(argv, message):
    with pytest.raises(ValueError) as refused:
        served(*argv.split())
    assert message in str(refused.value)


@pytest.mark.parametrize("argv", ["-np 0", "-np -2", "-n 0", "-c -1", "--models-max -1", "--pooling cls", "-t 0",
                                  "--repeat-last-n -1", "--dry-penalty-last-n -1", "--mirostat 1.5", "--top-k x",
                                  "--spec-type draft-eagle3", "--spec-type ngram-simple,ngram-mod",
                                  "--spec-ngram-simple-size-m -1", "-ctk f16", "-ctv q4_0"])
def test_values_llama_server_refuses_are_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *argv.split()])
    assert exit_info.value.code == 2 and argv.split()[0] in capsys.readouterr().err


# ---------------------------------------------------------------- sampling defaults


@pytest.mark.parametrize("argv, breakers", [
    ("--dry-sequence-breaker a --dry-sequence-breaker b", ["a", "b"]),  # in place of the default ones
    ("--dry-sequence-breaker none", []),
    ("--dry-sequence-breaker a --dry-sequence-breaker none --dry-sequence-breaker b", ["b"]),  # none clears
    ("--dry-sequence-breaker \\n\\\\n\\q\\\"", ["\n\\n\\q\""]),  # llama.cpp's escapes; others stay
])
def test_dry_sequence_breakers_as_llama_server_collects_them(argv, breakers):
    assert served(*argv.split()).chat.defaults["dry_sequence_breakers"] == breakers


def test_the_sampling_defaults_are_the_request_fields_llama_cpp_names():
    argv = "--temp 0.7 --repeat-penalty 1.5 --repeat-last-n 32 --mirostat 2 --mirostat-ent 3 --dry-multiplier 0.8"
    assert served(*argv.split()).chat.defaults == {"temperature": 0.7, "repeat_penalty": 1.5, "repeat_last_n": 32,
                                                   "mirostat": 2, "mirostat_tau": 3.0, "dry_multiplier": 0.8}


# ---------------------------------------------------------------- models and names


def test_dash_m_is_one_more_model_and_a_names_only_one(files):
    both = served(files["gguf"], "-m", str(default_model_path()), "--no-embedding-model").models.entries()
    assert [e.source for e in both] == [files["gguf"], str(default_model_path())]
    with pytest.raises(ValueError, match=r"--served-model-name \(-a\) names one MODEL"):
        served(files["gguf"], "-m", str(default_model_path()), "-a", "x")


def test_a_unix_socket_host_listens_there():
    assert served("--host", "/tmp/lmserve.sock").listen == {"uds": "/tmp/lmserve.sock"}


def test_a_jinja_template_given_inline_is_used_as_it_is():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert served("--chat-template", template).engine.chat_template == template


def test_accepted_flags_are_logged_at_start_up(monkeypatch, caplog):
    import lmserve.server.graceful

    monkeypatch.setattr(lmserve.server.graceful, "serve", lambda *a, **k: None)  # no server started
    monkeypatch.setattr(serve_settings, "preflight_pinned", lambda models, config: None)
    with caplog.at_level("INFO", logger="lmserve"):
        cli.serve(build_parser().parse_args(["serve", "-ngl", "99", "--metrics", "--no-embedding-model"]))
    logged = [r.getMessage() for r in caplog.records]
    assert "-ngl 99 changes nothing: lmserve runs on the CPU; as llama.cpp built without GPU support, it offloads " \
           "no layer" in logged
    assert "--metrics changes nothing: GET /metrics is always served" in logged


def test_a_name_given_to_the_one_model_holds_beside_a_models_folder(files, tmp_path):
    folder = tmp_path / "more"
    folder.mkdir()
    entries = served(files["gguf"], "-a", "mine,other", "--models-dir", str(folder)).models.entries()
    assert [(e.id, e.aliases, e.pinned) for e in entries][0] == ("mine", ("other",), False)


@pytest.mark.parametrize("argv, message", [
    ("{gguf} {gguf} -md {gguf}", "--draft-model drafts for one chat MODEL"),
    ("--embedding -md {gguf}", "--draft-model drafts for one chat MODEL"),
    ("-md {dir}/missing.gguf", "does not exist"),
    ("-md {gguf} --spec-type none", "--spec-type none/ngram-simple cannot be given with --draft-model"),
    ("-md {gguf} --spec-type ngram-simple", "--spec-type none/ngram-simple cannot be given with --draft-model"),
    ("-md {gguf} --spec-type draft-simple,ngram-simple --spec-ngram-simple-size-m 0",
     "--spec-type ngram-simple asks for prompt lookup"),
])
def test_a_draft_model_where_it_cannot_apply_stops_start_up(argv, message, files):
    with pytest.raises(ValueError, match=message):
        served(*argv.format(**files).split())
