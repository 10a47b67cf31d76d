"""llama.cpp's sampler chain, for the rows that ask for it, vectorised over those rows.

After the penalties, logit bias, min_tokens and the grammar mask (sampler.py's processors,
which both paths share), a row's samplers run in its chain's `order` over its candidates, then
one draw from what is left: llama.cpp's common_sampler. Rows with the same plan run together:
one sort of their logits, then a mask per sampler (candidates.py).

Where lmserve chooses, or differs from llama.cpp:
- temperature 0 is greedy, as on the fast path: the argmax after DRY (llama.cpp runs its chain
  with a zero temperature, which differs only when XTC or typical_p drop the top token, or a
  dynatemp range makes the temperature positive again);
- Mirostat replaces the truncating samplers and dynamic temperature (plain temperature, then
  Mirostat, as in common/sampling.cpp), but DRY still applies first, like the other penalties
  (llama.cpp drops it); mu starts at 2 * tau and is updated after each sampled token;
- rows with post_sampling_probs and no chain run here in the fast path's order (temperature,
  min_p, top_k, top_p), so the distribution they report is the one they were sampled from;
- XTC's coin and the final draw come from the row's generator when it is seeded, so a seeded
  row is reproducible whatever shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmserve.request import SamplerChain, SamplingParams
from lmserve.sampling import candidates as cand
from lmserve.sampling.candidates import Candidates
from lmserve.sampling.draws import draw, take_rows, uniforms
from lmserve.sampling.dry import dry_penalties
from lmserve.sampling.logprobs import ChainLogprobs
from lmserve.sampling.metadata import SamplingMetadata
from lmserve.sampling.processors import last_tokens

FAST_PATH_CHAIN = SamplerChain(order=("temperature", "min_p", "top_k", "top_p"))


def runs_chain(p: SamplingParams) -> bool:
    """Whether a row is sampled here rather than on sampler.py's fast path."""
    return p.chain is not None or (p.post_sampling_probs and p.logprobs is not None)


def plan(p: SamplingParams) -> tuple[str, ...]:
    """The steps a row runs, in order; the draw follows."""
    chain = p.chain if p.chain is not None else FAST_PATH_CHAIN
    dry = ("dry",) if chain.dry is not None and "dry" in chain.order else ()
    if p.greedy:
        return (*dry, "greedy")
    if chain.mirostat:
        return (*dry, "plain_temperature", f"mirostat_v{chain.mirostat}")
    return tuple(step for step in chain.order if step != "dry" or dry)


@dataclass
class ChainResult:
    token_ids: torch.Tensor  # (n,) int64
    mirostat_mu: list[float | None]  # per row: mu after this step; None without Mirostat
    logprobs: ChainLogprobs | None  # rows (indices into these n) with post_sampling_probs and logprobs


@dataclass
class _Group:
    """Rows that run the same plan, and what their steps read."""

    params: list[SamplingParams]
    chains: list[SamplerChain]
    meta: SamplingMetadata  # these rows' inputs
    mus: torch.Tensor  # (g, 1) float64 Mirostat mu (2 * tau on a first step; unused without Mirostat)
    vocab_size: int

    @classmethod
    def build(cls, meta: SamplingMetadata, vocab_size: int, device: torch.device) -> _Group:
        chains = [p.chain if p.chain is not None else FAST_PATH_CHAIN for p in meta.params]
        mus = [meta.mu(i) if meta.mu(i) is not None else 2.0 * c.mirostat_tau for i, c in enumerate(chains)]
        return cls(meta.params, chains, meta, torch.tensor(mus, dtype=torch.float64, device=device)[:, None],
                   vocab_size)

    def settings(self, name: str) -> list:
        return [getattr(c, name) for c in self.chains]


def sample_chain(x: torch.Tensor, meta: SamplingMetadata) -> ChainResult:
    """Sample each row of (n, V) processed logits `x` through its chain. Never modifies `x`."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, p in enumerate(meta.params):
        groups.setdefault(plan(p), []).append(row)
    token_ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)  # (n,)
    mus: list[float | None] = [None] * x.shape[0]
    reports = []
    for steps, rows in groups.items():
        group = _Group.build(meta.select(rows), x.shape[1], x.device)
        final, chosen = _run(take_rows(x, rows), steps, group)
        token_ids[rows] = final.ids.gather(1, chosen).squeeze(1)
        for row, mu in zip(rows, _next_mus(final, chosen, steps, group)):
            mus[row] = mu
        reports.append(_report(final, chosen, rows, group))
    return ChainResult(token_ids, mus, _merge_reports([r for r in reports if r is not None]))


def _run(x: torch.Tensor, steps: tuple[str, ...], group: _Group) -> tuple[Candidates, torch.Tensor]:
    """The candidates the steps leave, and the drawn position (g, 1) in them."""
    greedy = steps[-1:] == ("greedy",)
    steps = tuple(step for step in steps if not _off(step, group))
    while steps and steps[0] in _BEFORE_SORT:  # llama.cpp's default order starts so
        x, steps = _BEFORE_SORT[steps[0]](x, group), steps[1:]
    c = Candidates.sort(x, limit=_leading_top_k(steps, group))
    for step in steps:
        c = _STEPS[step](c, group)
    if greedy:
        return c, torch.zeros(c.logits.shape[0], 1, dtype=torch.int64, device=x.device)
    chosen, _ = draw(c.probs(), uniforms(group.meta.generators, x.device))
    return c, chosen


def _off(step: str, group: _Group) -> bool:
    """Whether a step leaves every row of the group alone (so it need not wait for a sort)."""
    params, chains = group.params, group.chains
    off = {
        "top_k": lambda: all(p.top_k <= 0 for p in params),
        "typ_p": lambda: all(c.typical_p >= 1.0 for c in chains),
        "top_p": lambda: all(p.top_p >= 1.0 for p in params),
        "min_p": lambda: all(p.min_p <= 0.0 for p in params),
        "xtc": lambda: all(c.xtc_probability <= 0.0 or c.xtc_threshold > 0.5 for c in chains),
        "top_n_sigma": lambda: all(c.top_n_sigma <= 0.0 for c in chains),
    }
    return step in off and off[step]()


def _leading_top_k(steps: tuple[str, ...], group: _Group) -> int | None:
    """How many candidates the first sorted step can keep at most: top_k's largest k, or 1 when
    greedy; None when unknown. The sort then only needs that many."""
    if steps[:1] == ("greedy",):
        return 1
    if steps[:1] == ("top_k",) and all(p.top_k > 0 for p in group.params):
        return max(p.top_k for p in group.params)
    return None


def _subtract_dry(x: torch.Tensor, group: _Group) -> torch.Tensor:
    """(g, V) logits less each row's DRY penalties; a new tensor."""
    rows, ids, amounts = _dry_entries(group)
    if not rows:
        return x
    index = (torch.tensor(rows, device=x.device), torch.tensor(ids, device=x.device))
    return x.index_put(index, -torch.tensor(amounts, dtype=x.dtype, device=x.device), accumulate=True)


def _dry_sorted(c: Candidates, group: _Group) -> Candidates:
    """DRY later in the order: the same penalties, on candidates already sorted."""
    rows, ids, amounts = _dry_entries(group)
    if not rows:
        return c
    dense = torch.zeros(c.logits.shape[0], group.vocab_size, device=c.logits.device)  # (g, V)
    device = c.logits.device
    dense[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = torch.tensor(
        amounts, dtype=dense.dtype, device=device)
    return c.with_logits(c.logits - dense.gather(1, c.ids))


def _dry_entries(group: _Group) -> tuple[list[int], list[int], list[float]]:
    """(row, token id, penalty) of every DRY penalty in the group, as three lists."""
    rows, ids, amounts = [], [], []
    meta = group.meta
    for row, (p, chain) in enumerate(zip(group.params, group.chains)):
        if chain.dry is None:
            continue
        history = last_tokens(meta.prompt_ids[row], meta.output_ids[row], chain.dry.window)
        for token, amount in dry_penalties(history, chain.dry, p.unpenalized_ids).items():
            rows.append(row)
            ids.append(token)
            amounts.append(amount)
    return rows, ids, amounts


def _xtc(c: Candidates, group: _Group) -> Candidates:
    """XTC's coin comes from the row's generator (drawn whenever the row's XTC is on)."""
    on = [i for i, ch in enumerate(group.chains) if ch.xtc_probability > 0.0 and ch.xtc_threshold <= 0.5]
    if not on:
        return c
    chances = torch.full((c.logits.shape[0], 1), 2.0, device=c.logits.device)  # (g, 1); 2: never
    chances[on] = uniforms([group.meta.generators[i] for i in on], c.logits.device)
    return cand.xtc(c, chances, group.settings("xtc_probability"), group.settings("xtc_threshold"),
                    group.settings("min_keep"))


def _temperature(c: Candidates, group: _Group, dynamic: bool = True) -> Candidates:
    ranges = group.settings("dynatemp_range") if dynamic else [0.0] * len(group.params)
    return cand.temperature(c, [p.temperature for p in group.params], ranges, group.settings("dynatemp_exponent"))


def _plain_temperature(x: torch.Tensor, group: _Group) -> torch.Tensor:
    """Mirostat's temperature, on the unsorted logits: positive here (0 is greedy's plan)."""
    return x / cand.column([p.temperature for p in group.params], x, torch.float32)


# Steps that need no sorted candidates, for as long as a plan starts with them.
_BEFORE_SORT = {
    "dry": _subtract_dry,
    "top_n_sigma": lambda x, g: cand.top_n_sigma(x, g.settings("top_n_sigma")),
    "typ_p": lambda x, g: cand.typical(x, g.settings("typical_p"), g.settings("min_keep")),
    "plain_temperature": _plain_temperature,
    "mirostat_v2": lambda x, g: cand.mirostat_v2(x, g.mus),
}

_STEPS = {
    "dry": _dry_sorted,
    "top_k": lambda c, g: cand.top_k(c, [p.top_k for p in g.params]),
    "typ_p": lambda c, g: c.with_logits(cand.typical(c.logits, g.settings("typical_p"), g.settings("min_keep"))),
    "top_p": lambda c, g: cand.top_p(c, [p.top_p for p in g.params], g.settings("min_keep")),
    "min_p": lambda c, g: cand.min_p(c, [p.min_p for p in g.params], g.settings("min_keep")),
    "xtc": _xtc,
    "temperature": _temperature,
    "plain_temperature": lambda c, g: _temperature(c, g, dynamic=False),
    "top_n_sigma": lambda c, g: Candidates(cand.top_n_sigma(c.logits, g.settings("top_n_sigma")), c.ids).compact(),
    "mirostat_v1": lambda c, g: cand.mirostat_v1(c, g.mus, g.vocab_size),
    "mirostat_v2": lambda c, g: Candidates(cand.mirostat_v2(c.logits, g.mus), c.ids).compact(),
    "greedy": lambda c, g: c.keep_first(torch.ones_like(c.logits[:, :1], dtype=torch.int64)),
}


def _next_mus(final: Candidates, chosen: torch.Tensor, steps: tuple[str, ...], group: _Group) -> list[float | None]:
    """Mirostat's update, mu - eta * (surprise - tau), with the drawn token's surprise -log2 p
    under the distribution it was drawn from; a greedy row's mu stays; None without Mirostat."""
    if not steps or not steps[-1].startswith("mirostat"):
        return [group.meta.mu(i) if c.mirostat else None for i, c in enumerate(group.chains)]
    surprise = -final.probs().gather(1, chosen).log2()  # (g, 1)
    tau, eta = cand.column(group.settings("mirostat_tau"), surprise), cand.column(group.settings("mirostat_eta"), surprise)
    return (group.mus - eta * (surprise - tau)).squeeze(1).tolist()


def _report(final: Candidates, chosen: torch.Tensor, rows: list[int], group: _Group) -> ChainLogprobs | None:
    """post_sampling_probs: logprobs of the final candidates for the group's rows that asked."""
    asked = [i for i, p in enumerate(group.params) if p.post_sampling_probs and p.logprobs is not None]
    if not asked:
        return None
    index = torch.tensor(asked, device=final.logits.device)
    logprobs = final.logits.index_select(0, index).log_softmax(dim=-1)  # (r, W); -inf for dropped
    width = min(max(group.params[i].logprobs for i in asked), logprobs.shape[1])
    return ChainLogprobs(rows=[rows[i] for i in asked], sampled=logprobs.gather(1, chosen[index]).squeeze(1),
                         top_ids=final.ids.index_select(0, index)[:, :width], top_logprobs=logprobs[:, :width])


def _merge_reports(reports: list[ChainLogprobs]) -> ChainLogprobs | None:
    """One ChainLogprobs for every group's, padded to the widest (-inf, id 0)."""
    if not reports:
        return None
    width = max(r.top_ids.shape[1] for r in reports)
    pad = [width - r.top_ids.shape[1] for r in reports]
    return ChainLogprobs(
        rows=[row for r in reports for row in r.rows],
        sampled=torch.cat([r.sampled for r in reports]),
        top_ids=torch.cat([torch.nn.functional.pad(r.top_ids, (0, n)) for r, n in zip(reports, pad)]),
        top_logprobs=torch.cat([torch.nn.functional.pad(r.top_logprobs, (0, n), value=-torch.inf)
                                for r, n in zip(reports, pad)]))
