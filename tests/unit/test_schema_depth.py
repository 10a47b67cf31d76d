"""A JSON schema's nesting depth, counted through $ref, and the compiler's refusal of deep ones."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from lmserve.request import GrammarSpec
from lmserve.sampling.constraint_limits import GrammarLimits
from lmserve.sampling.grammar import GrammarCompiler, GrammarError
from lmserve.sampling.schema_depth import MAX_SCHEMA_DEPTH, embedded_schemas, schema_depth


def ref_chain(links: int) -> dict:
    """d0 -> d1 -> ... -> d{links}, each an object whose one property refers to the next."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(links)}
    defs[f"d{links}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def nested_objects(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_depth_counts_objects_and_arrays():
    assert schema_depth({"type": "integer"}) == 1
    assert schema_depth({"type": "object", "properties": {"a": {"type": "integer"}}}) == 3
    assert schema_depth({"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "null"}]}}) == 4
    assert schema_depth(nested_objects(10)) == 21
    assert schema_depth(True) == 0  # a boolean schema


def test_a_ref_nests_its_target_and_the_defs_table_itself_is_shallow():
    # root -> $defs -> d0, then each link d_i -> properties -> x ($ref) -> d_{i+1}: three levels
    assert schema_depth(ref_chain(1)) == 2 + 3 + 1
    assert schema_depth(ref_chain(20)) == 2 + 3 * 20 + 1
    unreferenced = {"$defs": {f"d{i}": nested_objects(1) for i in range(20)}}
    assert schema_depth(unreferenced) == 2 + 3


def test_pointers_are_unescaped_and_indexed():
    deep = nested_objects(5)  # depth 11

    def referring(pointer: str, **tables) -> dict:  # through the reference: 3 + 11; through a table: 2 + 11
        return {"type": "object", "properties": {"p": {"$ref": pointer}}, **tables}

    assert schema_depth(referring("#/$defs/a~1b", **{"$defs": {"a/b": deep}})) == 14
    assert schema_depth(referring("#/$defs/t~0", **{"$defs": {"t~": deep}})) == 14
    assert schema_depth(referring("#/$defs/a%20b", **{"$defs": {"a b": deep}})) == 14
    assert schema_depth(referring("#/anyOf/1", anyOf=[{}, deep])) == 14
    for unresolved in ("#/$defs/missing", "#/anyOf/7", "other.json#/x", "#anchor"):
        assert schema_depth(referring(unresolved, **{"$defs": {"x": deep}}, anyOf=[deep])) == 13


def test_a_recursive_schema_adds_nothing_for_its_cycle():
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    assert schema_depth(tree) == 4
    assert schema_depth({"$ref": "#"}) == 1
    mutual = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
    assert schema_depth(mutual) == 4  # root -> $defs -> a -> b, where b's reference back to a stops


def test_the_walk_stops_past_the_limit_and_needs_no_recursion():
    assert schema_depth(nested_objects(10), limit=5) == 6
    assert schema_depth(ref_chain(50_000)) == MAX_SCHEMA_DEPTH + 1  # Python's recursion would fail here
    assert schema_depth(ref_chain(40)) <= MAX_SCHEMA_DEPTH < schema_depth(ref_chain(43))


def test_embedded_schemas_are_found_in_a_structural_tag_but_not_inside_a_schema():
    inner = {"type": "object", "properties": {"type": {"const": "json_schema"}, "json_schema": {"type": "string"}}}
    tag = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<"], "tags": [
        {"begin": "<a>", "content": {"type": "json_schema", "json_schema": inner}, "end": "</a>"},
        {"begin": "<b>", "content": {"type": "json_schema", "json_schema": {"type": "integer"}}, "end": "</b>"}]}}
    found = list(embedded_schemas(tag))
    assert len(found) == 2 and inner in found and {"type": "integer"} in found


@pytest.fixture(scope="module")
def unsized_compiler(default_tokenizer):
    """A compiler without size limits: the depth check must hold on its own (limits may be raised)."""
    limits = GrammarLimits(max_schema_bytes=2**30, max_schema_nodes=2**30)
    return GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, limits=limits)


@pytest.mark.parametrize("links", [4_000, 50_000])
def test_the_compiler_refuses_a_deep_ref_chain(unsized_compiler, links):
    with pytest.raises(GrammarError, match=f"nests deeper than {MAX_SCHEMA_DEPTH} levels"):
        unsized_compiler.compile(GrammarSpec("json_schema", json.dumps(ref_chain(links))))


def test_the_compiler_refuses_a_deep_schema_inside_a_structural_tag(unsized_compiler):
    for schema in (ref_chain(4_000), json.dumps(ref_chain(4_000))):  # as an object and as JSON text
        tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>",
                                                   "content": {"type": "json_schema", "json_schema": schema}}}
        with pytest.raises(GrammarError, match="nests deeper"):
            unsized_compiler.compile(GrammarSpec("structural_tag", json.dumps(tag)))


def test_json_nested_past_the_parsers_own_limit_is_refused(unsized_compiler):
    text = '{"type": "array", "items": ' * 100_000 + "{}" + "}" * 100_000
    with pytest.raises(GrammarError, match="nests deeper"):
        unsized_compiler.compile(GrammarSpec("json_schema", text))


def test_a_schema_at_the_limit_still_compiles_and_constrains(grammar_compiler, default_tokenizer):
    schema = ref_chain(40)
    assert schema_depth(schema) <= MAX_SCHEMA_DEPTH
    matcher = xgr.GrammarMatcher(grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(schema))))
    text = '{"x": ' * 40 + "7" + "}" * 40  # the compiler's separators: ", " and ": "
    for token in default_tokenizer.encode(text):
        assert matcher.accept_token(token)
    assert matcher.is_terminated() or matcher.accept_token(next(iter(default_tokenizer.eos_token_ids)))
