"""Every llama-server flag, and what `lmserve serve` does with it: honoured, accepted or refused
by name.

LLAMA_SERVER_FLAGS lists every flag of llama-server's README tables (Common, Sampling and
Server-specific params, llama.cpp 0c1e570), every spelling, as one of:

- honoured: it does in lmserve what it does in llama-server. It is one of the serve command's own
  options (`note` says what it sets): another spelling of an lmserve option, or one of
  llama_options.py's (sampling_defaults.py's for the sampling options).
- accepted: lmserve already does what it asks (continuous batching, metrics, Jinja templates), or
  on a CPU-only server it asks nothing (-ngl 99, as llama.cpp built without GPU support takes
  it). It parses, and start-up logs why it changes nothing. `values`, when set, are the only
  values for which that holds; any other is refused.
- refused: parsing stops, naming the flag and why.

llama_flags.py adds the accepted and refused ones to the serve command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FlagKind = Literal["honoured", "accepted", "refused"]


@dataclass(frozen=True)
class LlamaFlag:
    spellings: tuple[str, ...]
    kind: FlagKind
    note: str  # honoured: what it sets; accepted: why nothing needs doing; refused: why not
    values: tuple[str, ...] | None = None  # accepted: the values that holds for (None: any)
    takes_value: bool = False  # a value follows the flag


def _row(kind: FlagKind, spellings: str, note: str, values: tuple[str, ...] | None = None) -> LlamaFlag:
    """`spellings` as llama-server's README writes them ("-c, --ctx-size N"); a placeholder after
    a name (N, FNAME, [on|off]...) means the flag takes a value."""
    names, takes_value = [], False
    for part in spellings.split(", "):
        name, _, placeholder = part.partition(" ")
        names.append(name)
        takes_value = takes_value or bool(placeholder)
    return LlamaFlag(tuple(names), kind, note, values, takes_value)


def honoured(spellings: str, note: str) -> LlamaFlag:
    return _row("honoured", spellings, note)


def accepted(spellings: str, note: str, values: tuple[str, ...] | None = None) -> LlamaFlag:
    return _row("accepted", spellings, note, values)


def refused(spellings: str, note: str) -> LlamaFlag:
    return _row("refused", spellings, note)


_CPU = "lmserve runs on the CPU"
_GPU = f"{_CPU}: there is no GPU to place anything on"
_THREADS = "CPU affinity and priority: run lmserve under taskset, numactl or nice"
_DRAFT = ("lmserve's speculative decoding is prompt lookup (--spec-type ngram-simple, --speculative-ngram K) or a draft "
          "model (--draft-model PATH, --draft-dtype, --draft-tokens N), run on the model's own threads; llama.cpp's "
          "other speculative settings are not taken")
_LOOKUP_N = "lmserve's prompt lookup looks up the sequence's last 4, 3, then 2 tokens; the length is not a setting"
_ADAPTIVE = "lmserve has no adaptive-p sampler"
_MEDIA = "lmserve serves text models only"
_UI = "lmserve has no web UI"
_AGENT = "lmserve runs no tools of its own"
_LOG = "lmserve logs text to stderr and JSON access lines to stdout (--log-level sets how much)"
_PRESET = "a preset that downloads llama.cpp's choice of model: name a MODEL (hf:org/repo/file.gguf)"
_ROPE = "lmserve uses the model's own RoPE settings"

LLAMA_SERVER_FLAGS: tuple[LlamaFlag, ...] = (
    # ---- Common params
    honoured("-h, --help, --usage", "print this help"),
    honoured("--version", "print lmserve's version"),
    refused("-cl, --cache-list", "models are in the Hugging Face cache: `hf cache ls` lists them"),
    refused("--completion-bash", "no shell completion script"),
    honoured("-t, --threads N", "--threads: torch threads (-1: torch's default)"),
    refused("-tb, --threads-batch N", "one thread count (--threads) serves prompts and generation"),
    refused("-C, --cpu-mask M", _THREADS),
    refused("-Cr, --cpu-range lo-hi", _THREADS),
    refused("--cpu-strict <0|1>", _THREADS),
    refused("--prio N", _THREADS),
    refused("--poll <0...100>", "torch's threads wait as torch decides"),
    refused("-Cb, --cpu-mask-batch M", _THREADS),
    refused("-Crb, --cpu-range-batch lo-hi", _THREADS),
    refused("--cpu-strict-batch <0|1>", _THREADS),
    refused("--prio-batch N", _THREADS),
    refused("--poll-batch <0|1>", "torch's threads wait as torch decides"),
    honoured("-c, --ctx-size N", "the KV cache in tokens, split across the -np slots: each request's context is "
                                 "N / -np (--max-model-len), or N with -kvu or without -np; 0: the model's"),
    honoured("-n, --predict, --n-predict N", "max_tokens of requests that send none, ending at the context's end "
                                             "(-1: until the context ends)"),
    accepted("-b, --batch-size N", "lmserve cuts prompts into steps of --max-num-batched-tokens (-ub); it has no "
                                   "second, logical batch size"),
    honoured("-ub, --ubatch-size N", "--max-num-batched-tokens"),
    refused("--keep N", "lmserve never shifts the context, so there is nothing to keep"),
    accepted("--swa-full", "lmserve keeps every layer's whole KV cache"),
    accepted("-fa, --flash-attn [on|off|auto]", "lmserve's attention is its own paged kernel: there is no "
                                                "flash-attention switch", ("on", "off", "auto")),
    refused("--perf", "lmserve prints no libllama timings (GET /metrics has its own)"),
    accepted("--no-perf", "lmserve prints no libllama timings"),
    honoured("-e, --escape, --no-escape", "whether --dry-sequence-breaker's escapes (\\n, \\t, \\xHH ...) are "
                                         "processed (the default), as llama-server does"),
    refused("--rope-scaling {none,linear,yarn}", _ROPE),
    refused("--rope-scale N", _ROPE),
    refused("--rope-freq-base N", _ROPE),
    refused("--rope-freq-scale N", _ROPE),
    refused("--yarn-orig-ctx N", _ROPE),
    refused("--yarn-ext-factor N", _ROPE),
    refused("--yarn-attn-factor N", _ROPE),
    refused("--yarn-beta-slow N", _ROPE),
    refused("--yarn-beta-fast N", _ROPE),
    accepted("-kvo, --kv-offload, -nkvo, --no-kv-offload", f"{_CPU}: the KV cache is in main memory"),
    accepted("--repack", "lmserve lays quantized weights out for its own kernels"),
    refused("-nr, --no-repack", "lmserve always lays quantized weights out for its own kernels"),
    refused("--no-host", _GPU),
    honoured("-ctk, --cache-type-k TYPE", "q8_0, with -ctv q8_0: --kv-cache-dtype int8 (other types are refused: "
                                          "the float KV cache takes the weights' float type)"),
    honoured("-ctv, --cache-type-v TYPE", "q8_0, with -ctk q8_0: --kv-cache-dtype int8"),
    accepted("-dt, --defrag-thold N", "deprecated in llama.cpp; a paged KV cache needs no defragmenting"),
    refused("--rpc SERVERS", "lmserve runs on this machine only"),
    refused("-lm, --load-mode MODE", "lmserve reads a GGUF through mmap and keeps its own copy of the weights"),
    refused("-lzm, --lazy-mode MODE", "lmserve keeps every weight resident"),
    refused("--numa TYPE", _THREADS),
    accepted("-dev, --device <dev1,dev2,..>", _CPU, ("none",)),
    refused("--list-devices", _CPU),
    refused("-ot, --override-tensor <tensor name pattern>=<buffer type>,...", _GPU),
    accepted("-cmoe, --cpu-moe", f"{_CPU}: every weight is in main memory"),
    accepted("-ncmoe, --n-cpu-moe N", f"{_CPU}: every weight is in main memory"),
    accepted("-ncffn, --n-cpu-ffn N", f"{_CPU}: every weight is in main memory"),
    accepted("-ngl, --gpu-layers, --n-gpu-layers N", f"{_CPU}; as llama.cpp built without GPU support, it "
                                                     "offloads no layer"),
    refused("-sm, --split-mode {none,layer,row,tensor}", _GPU),
    refused("-ts, --tensor-split N0,N1,N2,...", _GPU),
    refused("-mg, --main-gpu INDEX", _GPU),
    accepted("-fit, --fit [on|off]", "lmserve never changes the settings it is given to fit memory", ("off",)),
    refused("-fitt, --fit-target MiB0,MiB1,MiB2,...", "lmserve never changes the settings it is given to fit "
                                                      "memory (--models-memory caps what loaded models take)"),
    refused("-fitc, --fit-ctx N", "lmserve never changes the settings it is given to fit memory"),
    refused("--check-tensors", "no tensor data check"),
    refused("--override-kv KEY=TYPE:VALUE,...", "lmserve reads a GGUF's metadata as it is"),
    accepted("--op-offload, --no-op-offload", f"{_CPU}: there is no device to offload to"),
    refused("--lora FNAME", "lmserve has no LoRA adapters"),
    refused("--lora-scaled FNAME:SCALE,...", "lmserve has no LoRA adapters"),
    refused("--control-vector FNAME", "lmserve has no control vectors"),
    refused("--control-vector-scaled FNAME:SCALE,...", "lmserve has no control vectors"),
    refused("--control-vector-layer-range START END", "lmserve has no control vectors"),
    honoured("-m, --model FNAME", "MODEL"),
    honoured("-mu, --model-url MODEL_URL", "MODEL (an https:// URL of a GGUF)"),
    refused("-dr, --docker-repo [<repo>/]<model>[:quant]", "name a MODEL (a GGUF, hf:org/repo/file.gguf or https://)"),
    honoured("-hf, -hfr, --hf-repo <user>/<model>[:quant]", "with -hff FILE: MODEL hf:<user>/<model>/FILE"),
    honoured("-hff, --hf-file FILE", "with -hf: the GGUF file of the repo"),
    refused("-hft, --hf-token TOKEN", "set HF_TOKEN in the environment (lmserve reads it, as llama-server does "
                                      "by default)"),
    refused("--log-disable", _LOG),
    refused("--log-file FNAME", _LOG),
    refused("--log-jsonl, --no-log-jsonl", _LOG),
    accepted("--log-colors [on|off|auto]", "lmserve's logs have no colours", ("off",)),
    honoured("-v, --verbose, --log-verbose", "--log-level debug"),
    refused("--offline", "set HF_HUB_OFFLINE=1: a model already in the cache is then used without the network"),
    honoured("-lv, --verbosity, --log-verbosity N", "--log-level: 0 or 1 error, 2 warning, 3 info, 4 or 5 debug"),
    accepted("--log-prefix", "lmserve's log lines carry the level and the logger's name"),
    refused("--no-log-prefix", _LOG),
    accepted("--log-timestamps", "lmserve's log lines carry the time"),
    refused("--no-log-timestamps", _LOG),
    refused("--spec-draft-type-k, -ctkd, --cache-type-k-draft TYPE", _DRAFT),
    refused("--spec-draft-type-v, -ctvd, --cache-type-v-draft TYPE", _DRAFT),
    # ---- Sampling params: the server's defaults for requests that leave a field out
    honoured("--samplers SAMPLERS", "samplers of requests that send none: llama.cpp's names, ';'-separated"),
    honoured("-s, --seed SEED", "seed of requests that send none (-1: random)"),
    honoured("--sampler-seq, --sampling-seq SEQUENCE", "samplers of requests that send none: the one-letter "
                                                       "sequence"),
    honoured("--ignore-eos", "ignore_eos of requests that send none"),
    honoured("--temp, --temperature N", "temperature of requests that send none (<= 0: greedy)"),
    honoured("--top-k N", "top_k of requests that send none (0: off)"),
    honoured("--top-p N", "top_p of requests that send none"),
    honoured("--min-p N", "min_p of requests that send none"),
    honoured("--top-nsigma, --top-n-sigma N", "top_n_sigma of requests that send none (-1: off)"),
    honoured("--xtc-probability N", "xtc_probability of requests that send none"),
    honoured("--xtc-threshold N", "xtc_threshold of requests that send none"),
    honoured("--typical, --typical-p N", "typical_p of requests that send none"),
    honoured("--repeat-last-n N", "repeat_last_n of requests that send none: repeat_penalty's window (0: off)"),
    honoured("--repeat-penalty N", "repeat_penalty of requests that send none (llama.cpp's: over the last "
                                   "repeat_last_n tokens, 64 unless --repeat-last-n)"),
    honoured("--presence-penalty N", "presence_penalty of requests that send none"),
    honoured("--frequency-penalty N", "frequency_penalty of requests that send none"),
    honoured("--dry-multiplier N", "dry_multiplier of requests that send none"),
    honoured("--dry-base N", "dry_base of requests that send none (< 1 is refused, where llama-server ignores it)"),
    honoured("--dry-allowed-length N", "dry_allowed_length of requests that send none"),
    honoured("--dry-penalty-last-n N", "dry_penalty_last_n of requests that send none"),
    honoured("--dry-sequence-breaker STRING", "dry_sequence_breakers of requests that send none: each one given, in "
                                              "place of the default ones (none: no breakers)"),
    refused("--adaptive-target N", _ADAPTIVE),
    refused("--adaptive-decay N", _ADAPTIVE),
    honoured("--dynatemp-range N", "dynatemp_range of requests that send none"),
    honoured("--dynatemp-exp N", "dynatemp_exponent of requests that send none"),
    honoured("--mirostat N", "mirostat of requests that send none"),
    honoured("--mirostat-lr N", "mirostat_eta of requests that send none"),
    honoured("--mirostat-ent N", "mirostat_tau of requests that send none"),
    refused("-l, --logit-bias TOKEN_ID(+/-)BIAS", "send logit_bias with the request"),
    refused("--grammar GRAMMAR", "send a grammar (or response_format) with the request"),
    refused("--grammar-file FNAME", "send a grammar (or response_format) with the request"),
    refused("-j, --json-schema SCHEMA", "send response_format (or json_schema) with the request"),
    refused("-jf, --json-schema-file FILE", "send response_format (or json_schema) with the request"),
    refused("-bs, --backend-sampling", "lmserve samples on the CPU"),
    # ---- Server-specific params
    refused("-lcs, --lookup-cache-static FNAME", _DRAFT),
    refused("-lcd, --lookup-cache-dynamic FNAME", _DRAFT),
    refused("--kv-unified-per-slot N", "--max-model-len caps each request's context"),
    refused("-ctxcp, --ctx-checkpoints, --swa-checkpoints N", "lmserve keeps no context checkpoints"),
    refused("-cms, --checkpoint-min-step N", "lmserve keeps no context checkpoints"),
    refused("-cram, --cache-ram N", "cached prompts stay in the KV cache (--kv-cache-memory); "
                                    "--no-prefix-caching turns caching off"),
    honoured("-kvu, --kv-unified", "with -np: each request may use all of -c"),
    honoured("-no-kvu, --no-kv-unified", "with -np: -c is split across the slots (the default)"),
    refused("--cache-idle-slots, --no-cache-idle-slots", "cached prompts stay in the KV cache until their blocks "
                                                         "are needed"),
    refused("--context-shift", "lmserve never shifts the context: a sequence ends at the context's end"),
    accepted("--no-context-shift", "lmserve never shifts the context"),
    refused("-r, --reverse-prompt PROMPT", "send stop with the request, or set a model's defaults.stop in --config"),
    honoured("-sp, --special", "skip_special_tokens false for requests that send none"),
    refused("--warmup", "lmserve runs no warm-up batch (a --config model's preload prefills a prompt)"),
    accepted("--no-warmup", "lmserve runs no warm-up batch"),
    refused("--spm-infill", "lmserve has no infill endpoint"),
    honoured("--pooling {none,mean,cls,last,rank}", "--chat-embedding-pooling (mean or last)"),
    honoured("-np, --parallel N", "--max-num-seqs, and -c split across them (-1: lmserve's default)"),
    accepted("-cb, --cont-batching", "lmserve always batches continuously"),
    refused("-nocb, --no-cont-batching", "lmserve always batches continuously"),
    refused("-mm, --mmproj FILE", _MEDIA),
    refused("-mmu, --mmproj-url URL", _MEDIA),
    accepted("--mmproj-auto", "lmserve serves text models only: there is no projector to use"),
    accepted("--no-mmproj, --no-mmproj-auto", "lmserve serves text models only"),
    accepted("--mmproj-offload, --no-mmproj-offload", "lmserve serves text models only"),
    refused("-mmdev, --mmproj-device DEVICE", _MEDIA),
    refused("--image-min-tokens N", _MEDIA),
    refused("--image-max-tokens N", _MEDIA),
    refused("--mtmd-batch-max-tokens N", _MEDIA),
    refused("--video-fps N", _MEDIA),
    refused("--video-timestamp-interval N", _MEDIA),
    refused("--video-ffmpeg-dir DIR", _MEDIA),
    honoured("-a, --alias STRING", "--served-model-name: the first name in sorted order is the id, as llama-server "
                                   "shows it, the others are aliases"),
    refused("--tags STRING", "lmserve's model list has no tags"),
    accepted("--embd-normalize N", "lmserve L2-normalises chat-model embeddings", ("2",)),
    honoured("--host HOST", "--host (one address, or a UNIX socket path ending in .sock)"),
    honoured("--port PORT", "--port"),
    refused("--reuse-port", "one lmserve process listens on a port"),
    refused("--path PATH", "lmserve serves no static files"),
    honoured("--cors-origins ORIGINS", "--allowed-origins (CORS is off unless given)"),
    refused("--cors-methods METHODS", "lmserve allows the methods its routes take"),
    refused("--cors-headers HEADERS", "lmserve allows any request header"),
    refused("--cors-credentials, --no-cors-credentials", "lmserve's CORS answers carry no credentials setting"),
    refused("--api-prefix PREFIX", "lmserve serves its routes at / and /v1"),
    refused("--ui-config, --webui-config JSON", _UI),
    refused("--ui-config-file, --webui-config-file PATH", _UI),
    refused("--ui-mcp-proxy, --webui-mcp-proxy", _UI),
    accepted("--no-ui-mcp-proxy, --no-webui-mcp-proxy", _UI),
    refused("--tools TOOL1,TOOL2,...", _AGENT),
    refused("--tools-runtime OPTION", _AGENT),
    refused("--mcp-servers-config PATH", _AGENT),
    refused("--mcp-servers-json JSON", _AGENT),
    refused("-ag, --agent", _AGENT),
    accepted("-no-ag, --no-agent", _AGENT),
    refused("--ui, --webui", _UI),
    accepted("--no-ui, --no-webui", _UI),
    honoured("--embedding, --embeddings", "serve MODEL for embeddings only: no packaged embedding model beside it, "
                                          "and the generation routes answer 501"),
    refused("--rerank, --reranking", "lmserve has no reranking endpoint"),
    honoured("--api-key KEY", "--api-key (comma-separated keys, as llama-server splits them)"),
    honoured("--api-key-file FNAME", "--api-key-file"),
    honoured("--ssl-key-file FNAME", "HTTPS, with --ssl-cert-file"),
    honoured("--ssl-cert-file FNAME", "HTTPS, with --ssl-key-file"),
    refused("--chat-template-kwargs STRING", "lmserve passes no extra variables to chat templates"),
    honoured("-to, --timeout N", "--read-timeout and --write-timeout: N seconds for a request to arrive and for "
                                 "a client to read its response"),
    refused("--sse-ping-interval N", "lmserve's streams send no pings"),
    accepted("--threads-http N", "one event loop serves every connection"),
    accepted("--cache-prompt", "lmserve caches prompts (prefix caching) unless --no-prefix-caching"),
    honoured("--no-cache-prompt", "--no-prefix-caching"),
    accepted("--cache-reuse N", "lmserve never shifts cached KV to reuse it", ("0",)),
    accepted("--metrics", "GET /metrics is always served"),
    refused("--props", "POST /props is not served: settings are fixed at start-up"),
    honoured("--slots, --no-slots", "whether GET /slots is served (ServerState.serve_slots)"),
    honoured("--slot-save-path PATH", "where slots are saved (ServerState.slot_save_path)"),
    refused("--media-path PATH", _MEDIA),
    honoured("--models-dir PATH", "--models-dir"),
    refused("--models-preset PATH", "lmserve reads its models from a TOML file: --config FILE"),
    honoured("--models-max N", "--max-loaded-models (0: no limit)"),
    honoured("--models-autoload, --no-models-autoload", "--no-autoload, or not"),
    accepted("--jinja", "lmserve always renders chat templates with Jinja"),
    refused("--no-jinja", "lmserve always renders chat templates with Jinja (--chat-template NAME gives llama.cpp's "
                          "built-in formats as Jinja)"),
    accepted("--reasoning-format FORMAT", "lmserve returns <think> text as reasoning_content", ("auto", "deepseek")),
    accepted("-rea, --reasoning [on|off|auto]", "lmserve reads reasoning when the chat template opens <think>",
             ("auto",)),
    accepted("--reasoning-effort LEVEL", "lmserve gives templates no reasoning effort", ("default",)),
    accepted("--reasoning-budget N", "lmserve puts no budget on reasoning", ("-1",)),
    refused("--reasoning-budget-message MESSAGE", "lmserve puts no budget on reasoning"),
    refused("--reasoning-preserve", "earlier reasoning_content is not shown to the model again"),
    accepted("--no-reasoning-preserve", "earlier reasoning_content is not shown to the model again"),
    honoured("--chat-template JINJA_TEMPLATE", "the chat template of every chat model: one of llama.cpp's built-in "
                                               "names lmserve has, or a Jinja template"),
    honoured("--chat-template-file JINJA_TEMPLATE_FILE", "the chat template of every chat model, from a file"),
    refused("--skip-chat-parsing", "lmserve parses tool calls and reasoning when the request and template call for it"),
    accepted("--no-skip-chat-parsing", "lmserve parses tool calls and reasoning"),
    refused("--prefill-assistant", "a last assistant message is a whole turn here, and a new one follows"),
    accepted("--no-prefill-assistant", "a last assistant message is a whole turn here, and a new one follows"),
    refused("-sps, --slot-prompt-similarity SIMILARITY", "any request reuses any cached prompt prefix"),
    refused("--lora-init-without-apply", "lmserve has no LoRA adapters"),
    accepted("--sleep-idle-seconds SECONDS", "a model served from start-up stays loaded (--default-ttl unloads "
                                             "models loaded on demand)", ("-1",)),
    refused("--log-prompts-dir PATH", _LOG),
    refused("--spec-draft-hf, -hfd, -hfrd, --hf-repo-draft <user>/<model>[:quant]", _DRAFT),
    refused("--spec-draft-threads, -td, --threads-draft N", _DRAFT),
    refused("--spec-draft-threads-batch, -tbd, --threads-batch-draft N", _DRAFT),
    refused("--spec-draft-cpu-mask, -Cd, --cpu-mask-draft M", _DRAFT),
    refused("--spec-draft-cpu-range, -Crd, --cpu-range-draft lo-hi", _DRAFT),
    refused("--spec-draft-cpu-strict, --cpu-strict-draft <0|1>", _DRAFT),
    refused("--spec-draft-prio, --prio-draft N", _DRAFT),
    refused("--spec-draft-poll, --poll-draft <0|1>", _DRAFT),
    refused("--spec-draft-cpu-mask-batch, -Cbd, --cpu-mask-batch-draft M", _DRAFT),
    refused("--spec-draft-cpu-strict-batch, --cpu-strict-batch-draft <0|1>", _DRAFT),
    refused("--spec-draft-prio-batch, --prio-batch-draft N", _DRAFT),
    refused("--spec-draft-poll-batch, --poll-batch-draft <0|1>", _DRAFT),
    refused("--spec-draft-override-tensor, -otd, --override-tensor-draft <tensor name pattern>=<buffer type>,...",
            _DRAFT),
    refused("--spec-draft-cpu-moe, -cmoed, --cpu-moe-draft", _DRAFT),
    refused("--spec-draft-n-cpu-moe, --spec-draft-ncmoe, -ncmoed, --n-cpu-moe-draft N", _DRAFT),
    honoured("--spec-draft-n-max N", "--draft-tokens N: the draft model's tokens per step"),
    refused("--spec-draft-n-min N", _DRAFT),
    refused("--spec-synth-len L", _DRAFT),
    refused("--spec-synth-rates P0,P1,...", _DRAFT),
    refused("--spec-draft-p-split, --draft-p-split P", _DRAFT),
    refused("--spec-draft-p-min, --draft-p-min P", _DRAFT),
    refused("--spec-draft-backend-sampling, --no-spec-draft-backend-sampling", _DRAFT),
    refused("--spec-draft-device, -devd, --device-draft <dev1,dev2,..>", _DRAFT),
    refused("--spec-draft-ngl, -ngld, --gpu-layers-draft, --n-gpu-layers-draft N", _DRAFT),
    honoured("--spec-draft-model, -md, --model-draft FNAME", "--draft-model: the draft model's GGUF or folder"),
    honoured("--spec-type none,draft-simple,draft-eagle3,draft-mtp,draft-dflash,draft-dspark,ngram-simple,ngram-map-k,"
             "ngram-map-k4v,ngram-mod,ngram-cache", "ngram-simple: prompt lookup (--speculative-ngram, on by default); "
             "draft-simple: the --draft-model's drafts (both: the draft model, and lookup on the steps it leaves); "
             "none: --speculative-ngram 0; the other types are refused"),
    refused("--spec-ngram-mod-n-min N", _DRAFT),
    refused("--spec-ngram-mod-n-max N", _DRAFT),
    refused("--spec-ngram-mod-n-match N", _DRAFT),
    refused("--spec-ngram-simple-size-n N", _LOOKUP_N),
    honoured("--spec-ngram-simple-size-m N", "--speculative-ngram N: the most tokens one draft proposes"),
    accepted("--spec-ngram-simple-min-hits N", "prompt lookup proposes what followed the n-gram's latest "
             "occurrence: one hit", ("1",)),
    refused("--spec-ngram-map-k-size-n N", _DRAFT),
    refused("--spec-ngram-map-k-size-m N", _DRAFT),
    refused("--spec-ngram-map-k-min-hits N", _DRAFT),
    refused("--spec-ngram-map-k4v-size-n N", _DRAFT),
    refused("--spec-ngram-map-k4v-size-m N", _DRAFT),
    refused("--spec-ngram-map-k4v-min-hits N", _DRAFT),
    refused("--draft, --draft-n, --draft-max N", _DRAFT),
    refused("--draft-min, --draft-n-min N", _DRAFT),
    refused("--spec-ngram-size-n N", _LOOKUP_N),
    honoured("--spec-ngram-size-m N", "--speculative-ngram N: the most tokens one draft proposes"),
    accepted("--spec-ngram-min-hits N", "prompt lookup proposes what followed the n-gram's latest "
             "occurrence: one hit", ("1",)),
    refused("--embd-gemma-default", _PRESET),
    refused("--fim-qwen-1.5b-default", _PRESET),
    refused("--fim-qwen-3b-default", _PRESET),
    refused("--fim-qwen-7b-default", _PRESET),
    refused("--fim-qwen-7b-spec", _PRESET),
    refused("--fim-qwen-14b-spec", _PRESET),
    refused("--fim-qwen-30b-default", _PRESET),
    refused("--gpt-oss-20b-default", _PRESET),
    refused("--gpt-oss-120b-default", _PRESET),
    refused("--vision-gemma-4b-default", _PRESET),
    refused("--vision-gemma-12b-default", _PRESET),
    refused("--spec-default", _DRAFT),
)
