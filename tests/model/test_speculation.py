"""Prompt-lookup speculative decoding on the real default model (float32: batch-invariant, so any
difference would be speculation's): token for token and text for text what plain greedy decoding
gives, stop strings, stop tokens and max_tokens included, in fewer steps when the text repeats."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lmserve.engine import speculation
from lmserve.engine.engine import FORCED_CHARS_PER_TOKEN
from lmserve.request import GrammarSpec, SamplingParams
from tests.helpers.pacing import AlwaysDraft
from tests.helpers.real_engine import PROMPTS, chat_ids, make_engine

REPEATING = [
    "Repeat this sentence exactly three times: The quick brown fox jumps over the lazy dog.",
    "Copy this list word for word: apple, banana, cherry, apple, banana, cherry, apple, banana, cherry.",
    "Rewrite this code with the same names:\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
]


def run(engine, prompts, params) -> tuple[list[tuple[list[int], str, object]], int]:
    """Every prompt at once: (tokens, text, finish reason) of each, and the steps taken."""
    results = {f"r{i}": ([], [], None) for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    steps = 0
    while engine.has_unfinished:
        for out in engine.step().outputs:
            tokens, text, _ = results[out.request_id]
            tokens.extend(out.new_token_ids)
            text.append(out.text_delta)
            results[out.request_id] = (tokens, text, out.finish_reason)
        steps += 1
    return [(tokens, "".join(text), reason) for tokens, text, reason in results.values()], steps


@pytest.fixture(scope="module")
def engines(default_model):
    plain, spec = make_engine(default_model), make_engine(default_model, speculative=4)
    # One compiler for both: a compile depends on the tokenizer only, and the {1,200} regex takes seconds.
    spec.grammar = plain.grammar
    return plain, spec


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=60),
    SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=9),
    SamplingParams(temperature=0, max_tokens=60, stop=("banana, cherry", "lazy", "\n\n")),
    SamplingParams(temperature=0, max_tokens=60, stop=("fox",), include_stop_str_in_output=True),
], ids=["eos", "ignore_eos", "max_tokens", "stop", "stop_included"])
def test_speculation_gives_exactly_plain_greedy_decoding(default_model, engines, params):
    plain, spec = engines
    prompts = [chat_ids(default_model.tokenizer, text) for text in REPEATING + PROMPTS[:2]]
    for batch in ([prompts[0]], prompts[1:]):  # alone, and four at once (the most that draft at rate 0.3: MAX_RUNNING)
        expected, plain_steps = run(plain, batch, params)
        got, spec_steps = run(spec, batch, params)
        assert got == expected
        assert spec_steps <= plain_steps


# Constraints the copied text fits (so drafts from the prompt stand) and one it does not (a JSON
# object: its drafts stand only inside its strings)
GRAMMARS = {
    "regex": GrammarSpec("regex", r"[A-Za-z ,.:]{1,200}"),
    "words": GrammarSpec("ebnf", 'root ::= word (", " word)*\nword ::= [a-z]+'),
    "json": GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["words"], "properties": {
        "words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 12}}})),
}


@pytest.mark.parametrize("name", GRAMMARS)
def test_under_a_grammar_speculation_gives_exactly_plain_greedy_decoding(default_model, engines, name):
    plain, spec = engines
    params = SamplingParams(temperature=0, max_tokens=60, grammar=GRAMMARS[name])
    prompts = [chat_ids(default_model.tokenizer, text) for text in REPEATING[:2]]
    accepted = spec.num_accepted_tokens
    expected, plain_steps = run(plain, prompts, params)
    got, spec_steps = run(spec, prompts, params)
    assert got == expected
    assert spec_steps <= plain_steps
    if name != "json":  # the copy fits these: drafts of it were kept
        assert spec.num_accepted_tokens - accepted >= 5


ORDER = GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["customer", "items", "priority"],
                                                "properties": {
    "customer": {"type": "object", "required": ["name", "email"], "properties": {
        "name": {"type": "string"}, "email": {"type": "string"}}},
    "items": {"type": "array", "maxItems": 1, "items": {"type": "object", "required": ["sku", "quantity"],
                                                        "properties": {"sku": {"type": "string", "maxLength": 8},
                                                                       "quantity": {"type": "integer"}}}},
    "priority": {"type": "string", "enum": ["standard", "express", "overnight"]}}}))
ORDER_TEXT = ("Extract the order as JSON. Order from Jane Doe (jane.doe@example.com, +44 20 7946 0958): 2 x SKU "
              "A-100, 1 x SKU B-220. Ship express.")


def test_under_a_schema_the_text_it_forces_is_drafted_and_the_output_stays_plain_decoding(default_model, engines):
    """The keys a schema forces are drafted as the tokenizer spells them: the output is plain greedy
    decoding's, in fewer steps than with prompt lookup alone."""
    plain, spec = engines
    lookup_only = make_engine(default_model, speculative=4)
    lookup_only._scheduler.forced = None
    lookup_only.grammar = plain.grammar
    forced_texts = []
    forced = spec._scheduler.forced

    def recorded(request, wanted):
        ids = forced(request, wanted)
        forced_texts.append(default_model.tokenizer.decode(ids))
        return ids

    params = SamplingParams(temperature=0, max_tokens=80, grammar=ORDER)
    prompts = [chat_ids(default_model.tokenizer, ORDER_TEXT)]
    expected, plain_steps = run(plain, prompts, params)
    lookup_result, lookup_steps = run(lookup_only, prompts, params)
    spec._scheduler.forced = recorded
    try:
        got, spec_steps = run(spec, prompts, params)
    finally:
        spec._scheduler.forced = forced
    assert got == expected == lookup_result
    assert json.loads(got[0][1])["priority"] == "express"  # the grammar finished the object
    assert ' "email": "' in forced_texts  # a key, after the model's own '",'
    assert 'ress"}' in forced_texts  # the rest of the enum's only match after "exp", and the object's end
    assert spec_steps < lookup_steps < plain_steps


def test_a_long_forced_text_is_cut_before_it_is_tokenized(default_model, monkeypatch):
    engine = make_engine(default_model, speculative=4)
    const = "a long constant, " * 1000
    params = SamplingParams(temperature=0, max_tokens=8,
                            grammar=GrammarSpec("json_schema", json.dumps({"const": const})))
    engine.add_request("r", chat_ids(default_model.tokenizer, "Write it."), params)
    tokenized = []
    encode = engine.tokenizer.encode_plain
    monkeypatch.setattr(engine, "tokenizer", SimpleNamespace(encode_plain=lambda text, **kw: tokenized.append(text)
                                                             or encode(text, **kw)))
    ids = engine._forced_ids(engine._live["r"].request, 3)
    assert default_model.tokenizer.decode(ids) == json.dumps(const)[:len(default_model.tokenizer.decode(ids))]
    assert len(ids) == 3 and tokenized == [json.dumps(const)[:3 * FORCED_CHARS_PER_TOKEN]]


def test_repeating_text_takes_fewer_steps_and_the_drafts_are_counted(default_model, engines):
    plain, spec = engines
    prompt = chat_ids(default_model.tokenizer, REPEATING[1])
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    drafted, accepted = spec.num_draft_tokens, spec.num_accepted_tokens
    expected, plain_steps = run(plain, [prompt], params)
    got, spec_steps = run(spec, [prompt], params)
    assert got == expected and len(got[0][0]) == 60
    kept = spec.num_accepted_tokens - accepted
    assert kept >= 10 and spec.num_draft_tokens - drafted >= kept
    assert spec_steps == plain_steps - kept  # every kept draft saves one step


def test_with_more_running_only_text_that_keeps_repeating_takes_drafts(default_model, monkeypatch):
    # a budget that lets all six in at the first step: six run (> MAX_RUNNING) until some finish
    plain, spec = make_engine(default_model, budget=1024), make_engine(default_model, budget=1024, speculative=4)
    prompts = [chat_ids(default_model.tokenizer, text) for text in REPEATING + PROMPTS[:3]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ran = []  # (the step's threshold, the request's rate, tokens proposed, drafts returned) of every call
    drafts = speculation.Drafter.drafts

    def spy(self, ids, room, threshold=speculation.WORTH):
        out = drafts(self, ids, room, threshold)
        ran.append((threshold, self.rate, len(self.last), len(out)))
        return out

    monkeypatch.setattr(speculation.Drafter, "drafts", spy)
    spec._scheduler.busy_pacer = AlwaysDraft()  # the pacer's timing aside (the next test)
    drafted = spec.num_draft_tokens
    assert run(spec, prompts, params)[0] == run(plain, prompts, params)[0]
    busy = [(rate, proposed, count) for threshold, rate, proposed, count in ran if threshold == speculation.BUSY_WORTH]
    assert len(busy) >= 6 * 10 and sum(count for *_, count in busy) >= 10  # drafts ran with six running
    assert spec.num_draft_tokens - drafted >= sum(count for *_, count in busy)  # and went through the model
    assert all(rate >= speculation.BUSY_WORTH for rate, _, count in busy if count)
    # and proposals a step of four would have run were held back
    assert any(speculation.WORTH <= rate < speculation.BUSY_WORTH and proposed and not count
               for rate, proposed, count in busy)


def test_with_more_running_drafts_run_in_every_other_step_until_the_pacer_has_timed_both(default_model, monkeypatch):
    """The scheduler's pacer times busy steps of decodes without drafts and with them in turn,
    PROBE_STEPS and TRIAL_STEPS; only those steps are timed, each of the six sequences decoding."""
    plain, spec = make_engine(default_model, budget=1024), make_engine(default_model, budget=1024, speculative=4)
    prompts = [chat_ids(default_model.tokenizer, text) for text in REPEATING * 2]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    timed = []  # (drafting, tokens per sequence, sequences, drafts run in the step) of every timed step
    record = speculation.Pacer.record
    drafted = [spec.num_draft_tokens]
    prompt_steps, timed_steps = [], []  # of every step: whether it computed prompt tokens; the timed ones'
    step = spec.step

    def counted():
        drafts = spec.num_draft_tokens
        done = step()  # the pacer's record() is called within it
        prompt_steps.append(done.stats.num_scheduled_tokens - (spec.num_draft_tokens - drafts) > len(prompts))
        return done

    def spy(self, tokens_per_seq, seconds, num_seqs):
        timed.append((self.drafting, tokens_per_seq, num_seqs, spec.num_draft_tokens - drafted[0]))
        drafted[0] = spec.num_draft_tokens
        timed_steps.append(len(prompt_steps))  # this step's index
        record(self, tokens_per_seq, seconds, num_seqs)

    monkeypatch.setattr(speculation.Pacer, "record", spy)
    monkeypatch.setattr(spec, "step", counted)
    assert run(spec, prompts, params)[0] == run(plain, prompts, params)[0]
    assert len(timed) >= 16 and any(prompt_steps)
    assert not any(prompt_steps[i] for i in timed_steps)  # the steps computing prompt tokens are not timed
    turns = min(len(timed), speculation.PROBE_STEPS + speculation.TRIAL_STEPS)  # then it judges (unit tests)
    probe, trial = timed[0:turns:2], timed[1:turns:2]
    assert all(not drafting and tokens == 1.0 and n == 6 and runs == 0 for drafting, tokens, n, runs in probe)
    assert all(drafting and n == 6 for drafting, _, n, _ in trial)
    assert sum(runs for *_, runs in trial) >= 20 and max(tokens for _, tokens, _, _ in trial) > 2  # drafts ran and stood
