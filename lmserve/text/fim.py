"""A model's fill-in-the-middle tokens, and the infill prompt llama.cpp's server builds from them.

The ids come from the GGUF metadata (`tokenizer.ggml.fim_*_token_id`, or the older
prefix/suffix/middle names) or, as llama.cpp falls back to, from the texts code models use
for them (Qwen2.5-Coder, StarCoder, DeepSeek-Coder, CodeLlama, CodeGemma, GLM).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

_TEXTS = {
    "prefix": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
               "<|code_prefix|>", "<|fim▁begin|>"),
    "suffix": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
               "<|code_suffix|>", "<|fim▁hole|>"),
    "middle": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
               "<|code_middle|>", "<|fim▁end|>"),
    "repo": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "file_sep": ("<|file_sep|>", "<fim-sep>", "<file_sep>"),
}
_GGUF_KEYS = {
    "prefix": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "suffix": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "middle": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "repo": ("tokenizer.ggml.fim_rep_token_id",),
    "file_sep": ("tokenizer.ggml.fim_sep_token_id",),
}
CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"  # llama.cpp's, between extra chunks when there is no file_sep


@dataclass(frozen=True)
class FimTokens:
    """The ids a model marks fill-in-the-middle with; None where it has no such token."""

    prefix: int | None = None
    suffix: int | None = None
    middle: int | None = None
    repo: int | None = None  # repository-level FIM (Qwen2.5-Coder): <|repo_name|> then files
    file_sep: int | None = None

    @property
    def missing(self) -> list[str]:
        """The tokens infill needs and this model lacks."""
        return [name for name in ("prefix", "suffix", "middle") if getattr(self, name) is None]


def fim_from_gguf(meta: Mapping[str, object], token_id: Callable[[str], int | None]) -> FimTokens:
    """The GGUF's FIM ids; a role the metadata leaves out is looked up by its usual texts."""
    found = {}
    for role, keys in _GGUF_KEYS.items():
        ids = [meta[key] for key in keys if isinstance(meta.get(key), int) and meta[key] >= 0]
        found[role] = ids[0] if ids else _by_text(role, token_id)
    return FimTokens(**found)


def fim_from_vocabulary(token_id: Callable[[str], int | None]) -> FimTokens:
    return FimTokens(**{role: _by_text(role, token_id) for role in _TEXTS})


def _by_text(role: str, token_id: Callable[[str], int | None]) -> int | None:
    return next((i for i in map(token_id, _TEXTS[role]) if i is not None), None)


def infill_ids(fim: FimTokens, encode: Callable[[str], list[int]], prefix: str, suffix: str,
               prompt_ids: list[int], extra: list[tuple[str, str]], bos_ids: list[int]) -> list[int]:
    """llama.cpp's infill prompt: [repo] [file chunks] [BOS] <PRE> prefix prompt <SUF> suffix <MID>.

    `extra` holds (filename, text) chunks of other files, put first. `prompt_ids` continue the
    prefix: the start of the middle the caller already has. `bos_ids`: [BOS] for models that
    want one. Nothing is cut to fit: a prompt
    too long for the context is refused by the caller.
    """
    ids = _extra_ids(fim, encode, extra) + bos_ids
    ids += [fim.prefix, *encode(prefix), *prompt_ids, fim.suffix, *encode(suffix), fim.middle]
    return ids


def _extra_ids(fim: FimTokens, encode: Callable[[str], list[int]], extra: list[tuple[str, str]]) -> list[int]:
    ids: list[int] = []
    if fim.repo is not None:
        ids += [fim.repo, *encode("myproject\n")]
    for filename, text in extra:
        ids += [fim.file_sep, *encode(filename + "\n")] if fim.file_sep is not None else encode(CHUNK_SEPARATOR)
        ids += encode(text)
    if fim.file_sep is not None:
        ids += [fim.file_sep, *encode("filename\n")]
    return ids
