"""GBNF grammars for structured output (response_format, llama.cpp's json_schema) and tool calls.

The JSON-Schema-to-GBNF conversion is llama-cpp-python's ``llama_cpp.llama_grammar.SchemaConverter``,
imported only where a grammar is built: the front end imports ``schema_problem`` and must never
load llama.cpp.

The converter silently ignores what it does not understand (``minimum``, ``uniqueItems``...) and
drops every keyword beside a ``$ref``, an ``anyOf``, an ``enum``..., so a grammar built from any
schema would give output that does not validate. ``schema_problem`` therefore admits only what the
converter enforces, in the combinations where it enforces it, and ``_prepare`` rewrites a schema
into the forms the converter handles correctly (type lists into ``anyOf``, ``$defs`` renamed apart
per tool, annotation-only schemas into "any value"). Three of the converter's literal and string
rules produce invalid JSON or bad GBNF; ``_converter`` fixes them (see there).
"""

from __future__ import annotations

import json
import re

from worker.tool_calls import CALL_CLOSE, CALL_OPEN

MAX_DEPTH = 16            # nesting of schemas inside a schema
MAX_NODES = 2000          # schemas (and enum values) in one schema
MAX_REPEAT = 256          # minItems, maxItems, minLength, maxLength, {m,n}: expanded into grammar text
MAX_PATTERN = 256         # characters in a pattern
JSON_OBJECT = {"type": "object"}  # the schema of response_format json_object: any JSON object
MAX_GRAMMAR_CHARS = 256 * 1024  # a grammar built here from schemas and tools
MAX_CLIENT_GRAMMAR_CHARS = 64 * 1024  # a GBNF grammar a client sends (llama.cpp's `grammar` field)
# Parentheses nested in one rule: llama.cpp's GBNF parser recurses once per level, and some 20000
# levels (a 40 KB grammar) overflow a thread's stack and kill the worker process.
MAX_GRAMMAR_NESTING = 512

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "discriminator"})
_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                       "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern",
                       "format", "minLength", "maxLength"})
_ROOT_ONLY = frozenset({"$defs", "definitions"})
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
STRING_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
_REF = re.compile(r"#/(\$defs|definitions)/([^/~]+)")
_QUANTIFIER = re.compile(r"\{([0-9]{1,6})(?:(,)([0-9]{0,6}))?\}")
_PATTERN_ESCAPABLE = "[]()|{}*+?"  # the escapes the converter turns into GBNF literals correctly
_FOR_ANY = frozenset({"enum", "const"})
_FOR_TYPE = {"object": _FOR_ANY | {"properties", "required", "additionalProperties"},
             "array": _FOR_ANY | {"items", "prefixItems", "minItems", "maxItems"},
             "string": _FOR_ANY | {"pattern", "format", "minLength", "maxLength"}}
_ANY = {"anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean", "null")]}


class GrammarError(ValueError):
    pass


class _Problem(Exception):
    pass


# -- checking a client's schema (pure Python) ---------------------------------------------------

def schema_problem(schema, param: str) -> str | None:
    """What is wrong with a JSON Schema a client sent, naming param and the place in the schema
    ("/properties/age"), or None when a grammar can enforce it. Linear in the schema's size."""
    try:
        _Checker(schema).check(schema, "", 0)
    except _Problem as exc:
        where, message = exc.args
        return f"{param}{' at ' + where if where else ''}: {message}"
    return None


def tool_parameters_problem(parameters, param: str) -> str | None:
    """schema_problem for a tool's ``parameters``, which must describe a JSON object (or be
    empty: any object)."""
    if parameters is None:
        return None
    problem = schema_problem(parameters, param)
    if problem or not set(parameters) - ANNOTATIONS:
        return problem
    if parameters.get("type") == "object" or ("type" not in parameters and
                                              ("properties" in parameters or "additionalProperties" in parameters)):
        return None
    return f"{param}: a function's parameters must be a schema of type object"


def _pointer(path: str, key) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bounded_int(node: dict, key: str, path: str) -> int | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
        raise _Problem(path, f"'{key}' must be an integer from 0 to {MAX_REPEAT}")
    return value


class _Checker:
    def __init__(self, root):
        self.root = root
        self.nodes = 0

    def check(self, node, path: str, depth: int) -> None:
        if not isinstance(node, dict):
            raise _Problem(path, "a schema must be a JSON object")
        if depth > MAX_DEPTH:
            raise _Problem(path, f"schemas nest more than {MAX_DEPTH} deep")
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Problem(path, f"the schema has more than {MAX_NODES} parts")
        for key in node:
            if key in _ROOT_ONLY:
                if depth or path:
                    raise _Problem(path, f"'{key}' is supported only at the top of the schema")
                defs = node[key]
                if not isinstance(defs, dict):
                    raise _Problem(_pointer(path, key), "must be an object of schemas")
                for name, sub in defs.items():
                    self.check(sub, _pointer(_pointer(path, key), name), depth + 1)
            elif key not in ANNOTATIONS and key not in _KEYWORDS:
                raise _Problem(path, f"keyword '{key}' is not supported (a grammar cannot enforce it)")
        keys = {k for k in node if k in _KEYWORDS}
        for alone in ("$ref", "anyOf", "oneOf", "allOf"):
            if alone in keys and keys - {alone}:
                others = ", ".join(sorted(keys - {alone}))
                raise _Problem(path, f"only annotations may stand beside '{alone}', not {others}")
        if "$ref" in keys:
            self._check_ref(node["$ref"], path)
        for union in ("anyOf", "oneOf", "allOf"):
            if union in keys:
                subs = node[union]
                if not isinstance(subs, list) or not subs:
                    raise _Problem(path, f"'{union}' must be a non-empty list of schemas")
                if union == "allOf" and len(subs) > 1:
                    raise _Problem(path, "'allOf' with more than one schema is not supported")
                for i, sub in enumerate(subs):
                    self.check(sub, _pointer(_pointer(path, union), i), depth + 1)
        types = self._check_type(node, path)
        if "const" in keys or "enum" in keys:
            self._check_values(node, keys, types, path)
            return
        self._check_object(node, path, depth)
        self._check_array(node, path, depth)
        self._check_string(node, types, path)

    def _check_ref(self, ref, path: str) -> None:
        found = _REF.fullmatch(ref) if isinstance(ref, str) else None
        if not found:
            raise _Problem(path, f"'$ref' {ref!r} is not supported: only local references "
                                 "\"#/$defs/<name>\" or \"#/definitions/<name>\"")
        defs = self.root.get(found.group(1)) if isinstance(self.root, dict) else None
        if not isinstance(defs, dict) or found.group(2) not in defs:
            raise _Problem(path, f"'$ref' {ref!r} does not resolve")

    @staticmethod
    def _check_type(node: dict, path: str) -> list[str] | None:
        if "type" not in node:
            return None
        types = node["type"]
        types = [types] if isinstance(types, str) else types
        if (not isinstance(types, list) or not types or len(set(map(str, types))) != len(types)
                or any(t not in JSON_TYPES for t in types)):
            raise _Problem(path, f"'type' must be one of {', '.join(JSON_TYPES)} or a list of them")
        return types

    def _check_values(self, node: dict, keys: set, types, path: str) -> None:
        if keys - {"const", "enum", "type"} or {"const", "enum"} <= keys:
            raise _Problem(path, "only 'type' and annotations may stand beside 'enum' or 'const'")
        values = [node["const"]] if "const" in node else node["enum"]
        if not isinstance(values, list) or not values:
            raise _Problem(path, "'enum' must be a non-empty list")
        self.nodes += len(values)
        if self.nodes > MAX_NODES:
            raise _Problem(path, f"the schema has more than {MAX_NODES} parts")
        for value in values:
            kind = _json_type(value)
            if types and kind not in types and not (kind == "integer" and "number" in types):
                raise _Problem(path, f"the value {json.dumps(value)[:40]} is not of the schema's type")

    def _check_object(self, node: dict, path: str, depth: int) -> None:
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise _Problem(path, "'properties' must be an object of schemas")
        for name, sub in properties.items():
            self.check(sub, _pointer(_pointer(path, "properties"), name), depth + 1)
        required = node.get("required", [])
        if (not isinstance(required, list) or not all(isinstance(r, str) for r in required)
                or len(set(required)) != len(required)):
            raise _Problem(path, "'required' must be a list of distinct property names")
        missing = [r for r in required if r not in properties]
        if missing:
            raise _Problem(path, f"'required' names {missing[0]!r}, which is not in 'properties'")
        extra = node.get("additionalProperties")
        if extra is not None and not isinstance(extra, bool):
            self.check(extra, _pointer(path, "additionalProperties"), depth + 1)

    def _check_array(self, node: dict, path: str, depth: int) -> None:
        low, high = _bounded_int(node, "minItems", path), _bounded_int(node, "maxItems", path)
        if low is not None and high is not None and low > high:
            raise _Problem(path, "'minItems' is above 'maxItems'")
        prefix = node.get("prefixItems")
        items = node.get("items")
        if prefix is not None:
            if not isinstance(prefix, list) or not prefix:
                raise _Problem(path, "'prefixItems' must be a non-empty list of schemas")
            if items is not None and items is not False:
                raise _Problem(path, "'items' beside 'prefixItems' is not supported (only false)")
            if not (low or 0) <= len(prefix) <= (len(prefix) if high is None else high):
                raise _Problem(path, "'prefixItems' gives a length outside 'minItems'..'maxItems'")
            for i, sub in enumerate(prefix):
                self.check(sub, _pointer(_pointer(path, "prefixItems"), i), depth + 1)
        elif items is not None:
            if not isinstance(items, dict):
                raise _Problem(path, "'items' must be a schema (use 'prefixItems' for tuples)")
            self.check(items, _pointer(path, "items"), depth + 1)

    @staticmethod
    def _check_string(node: dict, types, path: str) -> None:
        low, high = _bounded_int(node, "minLength", path), _bounded_int(node, "maxLength", path)
        if low is not None and high is not None and low > high:
            raise _Problem(path, "'minLength' is above 'maxLength'")
        stringy = types is None or "string" in types
        if (low is not None or high is not None) and (types is None or "string" not in types):
            raise _Problem(path, "'minLength' and 'maxLength' need \"type\": \"string\"")
        if "format" in node and stringy:
            if node["format"] not in STRING_FORMATS:
                raise _Problem(path, f"format {node['format']!r} is not supported (only "
                                     f"{', '.join(STRING_FORMATS[:4])})")
        if "pattern" in node:
            if "format" in node or low is not None or high is not None:
                raise _Problem(path, "'pattern' cannot be combined with 'format', 'minLength' or 'maxLength'")
            problem = _pattern_problem(node["pattern"])
            if problem:
                raise _Problem(_pointer(path, "pattern"), problem)


def _pattern_problem(pattern) -> str | None:
    """The regular-expression subset the converter turns into a correct grammar for a JSON string:
    anchored at both ends; literal characters, the escapes \\[ \\] \\( \\) \\| \\{ \\} \\* \\+ \\?,
    character classes without negation or escapes, groups, |, * + ? and {m,n}. Nothing that could
    produce '"', '\\' or a control character (which must be escaped inside a JSON string)."""
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        return f"a pattern must be a string of at most {MAX_PATTERN} characters"
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or pattern.endswith("\\$"):
        return "a pattern must start with ^ and end with $ (it must match the whole string)"
    body = pattern[1:-1]
    i, n, depth = 0, len(body), 0
    can_repeat = False      # the last thing read can take a quantifier
    empty_branch = True     # nothing read since the start, "(" or "|"
    while i < n:
        c = body[i]
        if c == "\\":
            if i + 1 >= n or body[i + 1] not in _PATTERN_ESCAPABLE:
                return (f"the escape {body[i:i + 2]!r} is not supported (write [.] for a dot, "
                        "[0-9] for a digit)")
            i += 2
        elif c == "[":
            end = body.find("]", i + 1)
            if end < 0:
                return "unbalanced [ in the pattern"
            problem = _class_problem(body[i + 1:end])
            if problem:
                return problem
            i = end + 1
        elif c == "(":
            if body[i + 1:i + 2] == "?":
                return "(?...) groups (lookaround, non-capturing, named) are not supported"
            depth += 1
            i += 1
            can_repeat, empty_branch = False, True
            continue
        elif c == ")" or c == "|":
            if empty_branch:
                return "empty alternatives or groups are not supported in a pattern"
            if c == ")":
                depth -= 1
                if depth < 0:
                    return "unbalanced ) in the pattern"
                can_repeat, empty_branch = True, False
            else:
                can_repeat, empty_branch = False, True
            i += 1
            continue
        elif c in "*+?{":
            if not can_repeat:
                return "a quantifier must follow a character, class or group (lazy quantifiers are not supported)"
            if c == "{":
                found = _QUANTIFIER.match(body, i)
                if not found:
                    return "a {m,n} quantifier must hold numbers"
                low = int(found.group(1))
                high = low if not found.group(2) else (int(found.group(3)) if found.group(3) else None)
                if high is None or low > high or high > MAX_REPEAT:
                    return f"{found.group(0)}: quantifiers need 0 <= m <= n <= {MAX_REPEAT}"
                i = found.end()
            else:
                i += 1
            can_repeat = False
            continue
        elif c == ".":
            return "'.' is not supported in a pattern (it would allow '\"'); use a character class"
        elif c in "^$]}":
            return f"{c!r} is only supported at the pattern's ends or escaped"
        elif c in '"' or ord(c) < 0x20:
            return "a pattern must not match '\"' or control characters"
        else:
            i += 1
        can_repeat, empty_branch = True, False
    if depth:
        return "unbalanced ( in the pattern"
    if empty_branch and body:
        return "empty alternatives or groups are not supported in a pattern"
    return None


def _class_problem(inner: str) -> str | None:
    if not inner or inner[0] == "^" or "\\" in inner or "[" in inner:
        return "character classes must be non-empty, without ^ negation, escapes or ["
    i = 0
    while i < len(inner):
        low = high = inner[i]
        if i + 2 < len(inner) and inner[i + 1] == "-":
            high = inner[i + 2]
            i += 3
        else:
            i += 1
        if low > high:
            return f"the range {low}-{high} in a character class is reversed"
        if ord(low) < 0x20 or low <= '"' <= high or low <= "\\" <= high:
            return "a character class must not match '\"', '\\' or control characters"
    return None


# -- building grammars (worker side) -----------------------------------------------------------

def _prepare(node, rename: dict):
    """A copy of a checked schema in the forms the converter handles correctly: annotations
    dropped ({} then means any value), type lists as anyOf, a one-schema allOf as its schema,
    arrays with a length but no items as arrays of anything, additionalProperties true as any
    value, and $refs renamed through ``rename``."""
    node = {k: v for k, v in node.items() if k not in ANNOTATIONS and k not in _ROOT_ONLY}
    if not node:
        return _ANY
    if "$ref" in node:
        return {"$ref": rename[node["$ref"]]}
    if "allOf" in node:
        return _prepare(node["allOf"][0], rename)
    for union in ("anyOf", "oneOf"):
        if union in node:
            return {"anyOf": [_prepare(sub, rename) for sub in node[union]]}
    if isinstance(node.get("type"), list):
        if len(node["type"]) > 1:  # each keyword goes to the one type it constrains: linear
            return {"anyOf": [_prepare({k: v for k, v in node.items() if k in _FOR_TYPE.get(t, _FOR_ANY)}
                                       | {"type": t}, rename) for t in node["type"]]}
        node["type"] = node["type"][0]
    if "properties" in node:
        node["properties"] = {k: _prepare(v, rename) for k, v in node["properties"].items()}
    extra = node.get("additionalProperties")
    if extra is True:
        node["additionalProperties"] = _ANY
    elif isinstance(extra, dict):
        node["additionalProperties"] = _prepare(extra, rename)
    if "prefixItems" in node:
        node.pop("items", None)
        node["prefixItems"] = [_prepare(sub, rename) for sub in node["prefixItems"]]
    elif "items" in node:
        node["items"] = _prepare(node["items"], rename)
    elif "minItems" in node or "maxItems" in node:
        node["items"] = _ANY
    return node


_CONVERTER_CLASS = None
# The converter's JSON string character admits raw control characters, which JSON forbids.
_STRICT_CHAR = r'[^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_GBNF_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_GBNF_LITERAL_SPECIAL = re.compile(r'[\\"\n\r\t]')


def gbnf_literal(text: str) -> str:
    """text as a GBNF string literal."""
    return '"' + _GBNF_LITERAL_SPECIAL.sub(lambda m: _GBNF_LITERAL_ESCAPES[m.group(0)], text) + '"'


def _converter():
    """A SchemaConverter whose literals escape backslashes: the original writes json.dumps('a"b')
    (enum values, const, property names) into GBNF with its backslash unescaped, which the GBNF
    parser rejects or reads as a different string."""
    global _CONVERTER_CLASS
    if _CONVERTER_CLASS is None:
        from llama_cpp.llama_grammar import SchemaConverter

        class Converter(SchemaConverter):
            def _format_literal(self, literal):
                return gbnf_literal(literal)

        _CONVERTER_CLASS = Converter
    return _CONVERTER_CLASS(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter, schema: dict, prefix: str) -> str:
    """Add the rules for schema to converter, every rule name starting with prefix (so that tools
    do not share rules by accident); returns the schema's rule name."""
    found = [(f"#/{container}/{name}", sub) for container in ("$defs", "definitions")
             for name, sub in (schema.get(container) or {}).items()]
    # Names no other rule can take: the converter looks a $ref's rule up by the last part of its
    # path, so a property named like a definition (or another tool's definition) would stand in.
    rename = {ref: f"#/$defs/{prefix}ref{k}-d" for k, (ref, _) in enumerate(found)}
    defs = {rename[ref].rsplit("/", 1)[1]: _prepare(sub, rename) for ref, sub in found}
    prepared = _prepare(schema, rename)
    if "$ref" in prepared:  # resolve_refs does not look beside a $ref, where the $defs would be
        prepared = {"anyOf": [prepared]}
    root = {"$defs": defs, **prepared} if defs else prepared
    try:
        root = converter.resolve_refs(root, prefix)
        return converter.visit(root, f"{prefix}value")
    except (AssertionError, ValueError, KeyError, RecursionError, TypeError, IndexError, AttributeError) as exc:
        raise GrammarError(f"the schema cannot be turned into a grammar: {exc}") from None


def grammar_problem(text, param: str) -> str | None:
    """What is wrong with a GBNF grammar a client sent, before llama.cpp parses it (which says
    only whether it parses): its size, and how deep its parentheses nest. Linear in the text."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_CLIENT_GRAMMAR_CHARS:
        return f"'{param}' must be a GBNF grammar of 1 to {MAX_CLIENT_GRAMMAR_CHARS} characters"
    depth = _nesting(text)
    if depth > MAX_GRAMMAR_NESTING:
        return f"'{param}' nests parentheses {depth} deep; at most {MAX_GRAMMAR_NESTING} are allowed"
    return None


def _nesting(text: str) -> int:
    """The deepest parenthesis nesting of GBNF text, outside literals, classes and comments."""
    deepest = depth = 0
    quote = None  # '"' inside a literal, "]" inside a character class
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c == '"':
            quote = '"'
        elif c == "[":
            quote = "]"
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def _finish(converter, extra_rules: dict[str, str]) -> str:
    rules = converter._rules
    if "char" in rules:
        rules["char"] = _STRICT_CHAR
    text = "\n".join([*(f"{name} ::= {rule}" for name, rule in extra_rules.items()), converter.format_grammar()])
    if len(text) > MAX_GRAMMAR_CHARS or _nesting(text) > MAX_GRAMMAR_NESTING:
        raise GrammarError(f"the grammar would be over {MAX_GRAMMAR_CHARS // 1024} KiB or nest over "
                           f"{MAX_GRAMMAR_NESTING} deep; simplify the schema")
    return text + "\n"


def json_schema_grammar(schema: dict) -> str:
    """GBNF for output that is a JSON value valid against schema."""
    problem = schema_problem(schema, "schema")
    if problem:
        raise GrammarError(problem)
    converter = _converter()
    return _finish(converter, {"root": _visit(converter, schema, "s-")})


def tool_call_grammar(tools: list[dict], tool_choice="auto", parallel: bool = True,
                      answer: dict | None = None) -> str:
    """GBNF for tool calls in tool_calls.call_block's format.

    "required" or {"name": ...}: the output is one call (one or more when parallel) and nothing
    else. "auto": free text that never contains CALL_OPEN (it may end in part of it), optionally
    followed by call(s): once the model opens a call, the grammar completes it. With an ``answer``
    schema (a JSON response_format beside the tools), "auto" is instead either the call(s) or a
    JSON value valid against it."""
    if isinstance(tool_choice, dict):
        chosen = [t for t in tools if t["name"] == tool_choice.get("name")]
        if not chosen:
            raise GrammarError(f"tool_choice names {tool_choice.get('name')!r}, which is not among the tools")
    elif tool_choice in ("auto", "required"):
        chosen = tools
    else:
        raise GrammarError(f"unknown tool_choice {tool_choice!r}")
    if not chosen:
        raise GrammarError("no tools to call")
    converter = _converter()
    alternatives = []
    for i, tool in enumerate(chosen):
        parameters = tool.get("parameters") or {}
        problem = tool_parameters_problem(parameters, f"tools[{i}].parameters")
        if problem:
            raise GrammarError(problem)
        if not set(parameters) - ANNOTATIONS:
            parameters = {"type": "object"}
        value = _visit(converter, parameters, f"t{i}-")
        head = json.dumps(tool["name"], ensure_ascii=False) + ', "arguments": '
        alternatives.append(f"{gbnf_literal(head)} {value}")
    rules = {
        "tc-calls": "tc-call ( \"\\n\" tc-call )*" if parallel else "tc-call",
        "tc-call": gbnf_literal(f'{CALL_OPEN}\n{{"name": ') + " tc-named "
                   + gbnf_literal(f"}}\n{CALL_CLOSE}"),
        "tc-named": " | ".join(alternatives),
    }
    if tool_choice == "auto" and answer is not None:
        problem = schema_problem(answer, "response_format")
        if problem:
            raise GrammarError(problem)
        rules = {"root": f"{_visit(converter, answer, 's-')} | tc-calls", **rules}
    elif tool_choice == "auto":
        rules = {"root": "tc-text0", **_text_without_open_tag(), **rules}
    else:
        rules = {"root": "tc-calls", **rules}
    return _finish(converter, rules)


def _text_without_open_tag() -> dict[str, str]:
    """Rules for any text without CALL_OPEN in it, then tc-end (calls or nothing): one rule per
    state of a matcher of CALL_OPEN, tc-text<k> having just read CALL_OPEN's first k characters.
    CALL_OPEN's first character ("<") occurs nowhere else in it, so a mismatch goes back to state
    1 on "<" and to state 0 on anything else."""
    first = CALL_OPEN[0]
    rules = {}
    for k in range(len(CALL_OPEN)):
        expected = CALL_OPEN[k]
        if k == 0:
            alternatives = [f"{gbnf_literal(first)} tc-text1", f"[^{first}] tc-text0"]
        else:
            alternatives = [f"{gbnf_literal(first)} tc-text1", f"[^{first}{expected}] tc-text0"]
            if k + 1 < len(CALL_OPEN):
                alternatives.insert(0, f"{gbnf_literal(expected)} tc-text{k + 1}")
        rules[f"tc-text{k}"] = " | ".join([*alternatives, "tc-end"])
    rules["tc-end"] = "tc-calls?"
    return rules
