"""Grammars for structured output and tool calls, compiled and run by the real llama.cpp grammar
sampler over SmolLM2's vocabulary, and the schema checks the front end makes."""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys

import llama_cpp as lc
import pytest

from conftest import CHAT_PATH, ROOT
from worker.grammar import (JSON_OBJECT, MAX_DEPTH, GrammarError, json_schema_grammar, schema_problem,
                            tool_call_grammar, tool_parameters_problem)
from worker.tool_calls import call_block


class Vocab:
    """SmolLM2's vocabulary alone (no weights), to compile grammars and feed them tokens."""

    def __init__(self, path):
        lc.llama_backend_init()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        self.model = lc.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.eos = lc.llama_vocab_eos(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (lc.llama_token * (len(data) + 8))()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def compiles(self, grammar: str) -> bool:
        sampler = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if sampler:
            lc.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether the grammar lets the model write text and then end. A token the grammar
        refuses is never accepted (llama.cpp would throw through ctypes and abort)."""
        sampler = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not compile"
        try:
            for token in [*self.tokenize(text), self.eos]:
                candidates = (lc.llama_token_data * 1)(lc.llama_token_data(token, 0.0, 0.0))
                array = lc.llama_token_data_array(candidates, 1, -1, False)
                lc.llama_sampler_apply(sampler, ctypes.byref(array))
                if math.isinf(candidates[0].logit):
                    return False
                if token != self.eos:
                    lc.llama_sampler_accept(sampler, token)
            return True
        finally:
            lc.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def vocab():
    v = Vocab(CHAT_PATH)
    yield v
    lc.llama_model_free(v.model)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "mood": {"enum": ["happy", "sad", 'say "hi"\\']},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                          "limit": {"type": "integer"}},
                         "required": ["query", "limit"]}}
NO_ARGS = {"name": "now", "description": "The time", "parameters": {}}


# -- response_format -----------------------------------------------------------------------------

def test_json_object_grammar(vocab):
    grammar = json_schema_grammar(JSON_OBJECT)
    assert vocab.accepts(grammar, '{"a": [1, "x"]}')
    assert vocab.accepts(grammar, '{"nested": {"b": null, "c": true, "d": -1.5e3}}')
    assert not vocab.accepts(grammar, "hello")
    assert not vocab.accepts(grammar, "[1, 2]")
    assert not vocab.accepts(grammar, '{"a": 1')  # incomplete: the end is refused
    assert not vocab.accepts(grammar, '{"a": "line\nbreak"}')  # raw control character in a string


def test_schema_grammar_accepts_valid_instances_and_refuses_wrong_types(vocab):
    grammar = json_schema_grammar(PERSON)
    assert vocab.accepts(grammar, '{"name": "Ann", "age": 31, "mood": "happy", "tags": ["a", "b"]}')
    assert vocab.accepts(grammar, '{"name": "Ann", "age": 31, "mood": "say \\"hi\\"\\\\", "tags": ["a"]}')
    assert not vocab.accepts(grammar, '{"name": "Ann", "age": "31", "mood": "happy", "tags": ["a"]}')
    assert not vocab.accepts(grammar, '{"name": "Ann", "age": 31, "mood": "angry", "tags": ["a"]}')
    assert not vocab.accepts(grammar, '{"name": "Ann", "age": 31, "mood": "sad", "tags": []}')
    assert not vocab.accepts(grammar, '{"name": "Ann", "age": 31, "mood": "sad", "tags": ["a", "b", "c", "d"]}')
    assert not vocab.accepts(grammar, '{"name": "Ann", "mood": "sad", "tags": ["a"]}')


PYDANTIC = {
    "$defs": {
        "Address": {"properties": {"street": {"title": "Street", "type": "string"},
                                   "zip": {"title": "Zip", "type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "zip"], "title": "Address", "type": "object"},
        "Color": {"enum": ["red", "green"], "title": "Color", "type": "string"},
    },
    "properties": {
        "name": {"description": "Full name", "title": "Name", "type": "string"},
        "address": {"$ref": "#/$defs/Address", "description": "Where"},
        "previous": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}], "default": None},
        "color": {"$ref": "#/$defs/Color", "default": "red"},
        "Color": {"enum": [1, 2], "title": "A property named like a definition"},
        "born": {"type": "string", "format": "date"},
        "scores": {"items": {"type": "number"}, "title": "Scores", "type": "array", "maxItems": 4},
        "nick": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}], "default": None},
    },
    "required": ["name", "address", "Color", "born", "scores"],
    "title": "Person",
    "type": "object",
    "additionalProperties": False,
}


def test_a_pydantic_style_schema_is_accepted_and_enforced(vocab):
    assert schema_problem(PYDANTIC, "response_format") is None
    grammar = json_schema_grammar(PYDANTIC)
    # The converter writes the required properties first, then the optional ones.
    good = ('{"name": "Ann", "address": {"street": "Main", "zip": "12345"}, "Color": 2, "born": "2001-02-03", '
            '"scores": [1, 2.5], "previous": null, "color": "green", "nick": "annie"}')
    assert vocab.accepts(grammar, good)
    assert vocab.accepts(grammar, '{"name": "A", "address": {"street": "M", "zip": "12345"}, "Color": 1, '
                                  '"born": "2001-02-03", "scores": []}')
    assert not vocab.accepts(grammar, good.replace('"12345"', '"1234"'))
    assert not vocab.accepts(grammar, good.replace('"Color": 2', '"Color": "red"'))
    assert not vocab.accepts(grammar, good.replace('"green"', '"blue"'))
    assert not vocab.accepts(grammar, good.replace('"annie"', '"annie-the-long"'))
    assert not vocab.accepts(grammar, good.replace("2001-02-03", "yesterday"))


def test_recursive_schemas_and_type_lists(vocab):
    tree = {"$defs": {"Node": {"type": "object", "properties": {"v": {"type": ["integer", "null"]},
                                                               "kids": {"type": "array",
                                                                        "items": {"$ref": "#/$defs/Node"}}},
                               "required": ["v", "kids"]}},
            "$ref": "#/$defs/Node"}
    grammar = json_schema_grammar(tree)
    assert vocab.accepts(grammar, '{"v": 1, "kids": [{"v": null, "kids": []}]}')
    assert not vocab.accepts(grammar, '{"v": 1, "kids": [{"v": "x", "kids": []}]}')
    anything = json_schema_grammar({"title": "anything"})
    for text in ('"s"', "12", "[1, {}]", "null", '{"a": 1}'):
        assert vocab.accepts(anything, text)


@pytest.mark.parametrize("pattern,good,bad", [
    ("^[a-z]+@[a-z]+[.]com$", "ann@mail.com", "ann@mail.org"),
    ("^(ab|c){2,3}\\?$", "abc?", "ab?"),
    ("^[A-Z]{3}-[0-9]*$", "ABC-", "AB-1"),
])
def test_patterns_compile_and_match(vocab, pattern, good, bad):
    grammar = json_schema_grammar({"type": "string", "pattern": pattern})
    assert vocab.accepts(grammar, f'"{good}"')
    assert not vocab.accepts(grammar, f'"{bad}"')


# -- tool calls ----------------------------------------------------------------------------------

def test_required_tool_call_grammar(vocab):
    grammar = tool_call_grammar([WEATHER, SEARCH, NO_ARGS], "required", parallel=False)
    assert vocab.accepts(grammar, call_block("get_weather", '{"city": "Paris", "unit": "celsius"}'))
    assert vocab.accepts(grammar, call_block("search", '{"query": "llama", "limit": 3}'))
    assert vocab.accepts(grammar, call_block("now", '{"anything": [1]}'))
    assert not vocab.accepts(grammar, call_block("get_time", '{"city": "Paris"}'))
    assert not vocab.accepts(grammar, call_block("search", '{"query": "llama"}'))
    assert not vocab.accepts(grammar, call_block("get_weather", '{"city": 3}'))
    assert not vocab.accepts(grammar, "Sure! " + call_block("get_weather", '{"city": "Paris"}'))
    assert not vocab.accepts(grammar, "Paris is sunny.")
    two = call_block("search", '{"query": "a", "limit": 1}') + "\n" + call_block("now", "{}")
    assert not vocab.accepts(grammar, two)
    assert vocab.accepts(tool_call_grammar([WEATHER, SEARCH, NO_ARGS], "required", parallel=True), two)


def test_named_tool_choice_allows_only_that_tool(vocab):
    grammar = tool_call_grammar([WEATHER, SEARCH], {"name": "search"}, parallel=True)
    assert vocab.accepts(grammar, call_block("search", '{"query": "x", "limit": 2}'))
    assert not vocab.accepts(grammar, call_block("get_weather", '{"city": "Paris"}'))
    with pytest.raises(GrammarError):
        tool_call_grammar([WEATHER], {"name": "search"}, parallel=True)


def test_auto_tool_call_grammar(vocab):
    grammar = tool_call_grammar([WEATHER, SEARCH], "auto", parallel=True)
    assert vocab.accepts(grammar, "The capital of France is Paris. <tool_ or <<tool_cal> are fine, ünïcode ✓")
    assert vocab.accepts(grammar, "ends in a partial tag <tool_c")
    assert vocab.accepts(grammar, "")
    assert vocab.accepts(grammar, "Let me check.\n" + call_block("get_weather", '{"city": "Paris"}'))
    assert vocab.accepts(grammar, call_block("get_weather", '{"city": "Paris"}') + "\n"
                         + call_block("search", '{"query": "x", "limit": 1}'))
    assert not vocab.accepts(grammar, "<tool_call>\nnonsense")
    assert not vocab.accepts(grammar, "a <<tool_call>\nnonsense")
    assert not vocab.accepts(grammar, call_block("get_weather", '{"city": "Paris"}') + " and more text")


def test_auto_tools_beside_a_json_answer_give_a_call_or_that_json(vocab):
    answer = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    grammar = tool_call_grammar([WEATHER], "auto", parallel=False, answer=answer)
    assert vocab.accepts(grammar, '{"city": "Paris"}')
    assert vocab.accepts(grammar, call_block("get_weather", '{"city": "Paris"}'))
    assert not vocab.accepts(grammar, "Free text.")
    assert not vocab.accepts(grammar, '{"town": "Paris"}')
    assert not vocab.accepts(grammar, '{"city": "Paris"}' + call_block("get_weather", '{"city": "Paris"}'))
    required = tool_call_grammar([WEATHER], "required", parallel=False, answer=answer)
    assert not vocab.accepts(required, '{"city": "Paris"}')  # a required call comes first; the JSON next turn


def test_tools_with_the_same_definition_names_do_not_share_rules(vocab):
    def tool(name, item):
        return {"name": name, "parameters": {"$defs": {"Item": item}, "type": "object",
                                             "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"]}}
    grammar = tool_call_grammar([tool("a", {"type": "integer"}), tool("b", {"type": "string"})], "required", True)
    assert vocab.accepts(grammar, call_block("a", '{"item": 1}'))
    assert vocab.accepts(grammar, call_block("b", '{"item": "x"}'))
    assert not vocab.accepts(grammar, call_block("a", '{"item": "x"}'))
    assert not vocab.accepts(grammar, call_block("b", '{"item": 1}'))


def test_every_grammar_compiles(vocab):
    for grammar in (json_schema_grammar(JSON_OBJECT), json_schema_grammar(PERSON), json_schema_grammar(PYDANTIC),
                    tool_call_grammar([WEATHER, SEARCH, NO_ARGS], "auto", True),
                    tool_call_grammar([WEATHER], "required", False),
                    tool_call_grammar([NO_ARGS], {"name": "now"}, False)):
        assert vocab.compiles(grammar)


def test_grammar_size_is_bounded():
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "minLength": 200, "maxLength": 256}
                                             for i in range(600)}}
    assert schema_problem(wide, "schema") is None
    with pytest.raises(GrammarError, match="KiB"):
        json_schema_grammar(wide)


# -- schema_problem ------------------------------------------------------------------------------

@pytest.mark.parametrize("keyword,value", [
    ("minimum", 0), ("maximum", 9), ("exclusiveMinimum", 0), ("multipleOf", 2), ("not", {}),
    ("if", {}), ("uniqueItems", True), ("contains", {}), ("patternProperties", {}), ("propertyNames", {}),
    ("minProperties", 1), ("maxProperties", 2), ("dependentRequired", {}), ("unevaluatedProperties", False),
    ("nullable", True),
])
def test_unsupported_keywords_are_refused_by_name(keyword, value):
    schema = {"type": "object", "properties": {"x": {"type": "integer", keyword: value}}}
    problem = schema_problem(schema, "response_format.json_schema.schema")
    assert problem and f"'{keyword}'" in problem and "/properties/x" in problem
    assert problem.startswith("response_format.json_schema.schema")


@pytest.mark.parametrize("schema,words", [
    (123, "JSON object"),
    ([], "JSON object"),
    ({"type": "string", "format": "email"}, "email"),
    ({"$ref": "https://example.com/schema.json"}, "local"),
    ({"$ref": "#/$defs/Missing", "$defs": {}}, "does not resolve"),
    ({"$ref": "#/properties/a"}, "local"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 10 ** 9}, "maxItems"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems"),
    ({"type": "strin"}, "'type'"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
    ({"enum": []}, "non-empty"),
    ({"enum": ["a", 1], "type": "string"}, "type"),
    ({"anyOf": [{"type": "string"}], "type": "string"}, "beside 'anyOf'"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {}}, "type": "object"}, "beside '$ref'"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"properties": {"a": {"$defs": {}}}}, "top of the schema"),
    ({"type": "string", "pattern": "[a-z]+"}, "start with ^"),
    ({"type": "string", "pattern": "^\\d+$"}, "escape"),
    ({"type": "string", "pattern": "^a.b$"}, "'.'"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "(?"),
    ({"type": "string", "pattern": "^[^,]+$"}, "negation"),
    ({"type": "string", "pattern": "^[ -~]+$"}, "must not match"),
    ({"type": "string", "pattern": "^a{1,1000}$"}, "quantifiers"),
    ({"type": "string", "pattern": "^a*?$"}, "quantifier"),
    ({"type": "string", "pattern": "^(a|)$"}, "empty"),
    ({"type": "string", "pattern": "^" + "a" * 300 + "$"}, "at most"),
    ({"maxLength": 3}, "type"),
])
def test_bad_schemas_are_refused(schema, words):
    problem = schema_problem(schema, "json_schema")
    assert problem and words in problem, problem


def test_depth_and_size_bombs_are_refused():
    deep = {"type": "string"}
    for _ in range(MAX_DEPTH + 5):
        deep = {"type": "array", "items": deep}
    assert "deep" in schema_problem(deep, "schema")
    very_deep = {}
    for _ in range(5000):
        very_deep = {"items": very_deep}
    assert "deep" in schema_problem(very_deep, "schema")
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    assert "parts" in schema_problem(wide, "schema")
    many = {"enum": list(range(5000))}
    assert "parts" in schema_problem(many, "schema")


def test_tool_parameters_must_describe_an_object():
    assert tool_parameters_problem({}, "tools[0].function.parameters") is None
    assert tool_parameters_problem({"title": "no args"}, "p") is None
    assert tool_parameters_problem(WEATHER["parameters"], "p") is None
    assert "object" in tool_parameters_problem({"type": "string"}, "tools[0].function.parameters")
    assert "minimum" in tool_parameters_problem({"type": "object", "properties": {"n": {"minimum": 1}}}, "p")


def test_the_front_end_can_import_schema_problem_without_llama_cpp():
    code = ("import sys; from worker.grammar import schema_problem; "
            "assert schema_problem({'type': 'object'}, 'x') is None; "
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_checks_hold_without_asserts():
    """python -O strips assert statements; the checks must not rely on them."""
    code = ("from worker.grammar import schema_problem; "
            "assert __debug__ is False; "
            "p = schema_problem({'type': 'string', 'pattern': 'abc'}, 'x'); "
            "import sys; sys.exit(0 if p and '^' in p else 1)")
    subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, check=True)


def test_client_grammars_are_bounded_in_size_and_nesting():
    from worker.grammar import MAX_GRAMMAR_NESTING, grammar_problem
    assert grammar_problem('root ::= ("a" | [()] | "(") # (((', "grammar") is None
    deep = "root ::= " + "(" * (MAX_GRAMMAR_NESTING + 1) + '"a"' + ")" * (MAX_GRAMMAR_NESTING + 1)
    assert f"{MAX_GRAMMAR_NESTING + 1} deep" in grammar_problem(deep, "grammar")
    assert grammar_problem("", "grammar") and grammar_problem(5, "grammar")
    fine = "root ::= " + "(" * MAX_GRAMMAR_NESTING + '"a"' + ")" * MAX_GRAMMAR_NESTING
    assert grammar_problem(fine, "grammar") is None
