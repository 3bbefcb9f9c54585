"""The generic tool-call format: prompts (generic and through a tools-aware template) and the
incremental parser of generated text."""

from __future__ import annotations

import json
import random

import pytest

from conftest import CHAT_PATH
from worker.chat_template import ChatTemplate
from worker.tool_calls import (CALL_OPEN, ToolCallParser, call_block, prepare_messages, template_uses_tools,
                               tools_prompt)

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SEARCH = {"name": "search", "description": "Search the web", "parameters": {}}

ARGS_A = '{"city": "Paris", "note": "a } and a \\" and {[", "n": [1, {"x": null}]}'
ARGS_B = '{}'
OUTPUT = ("Let me look that up.\n"
          f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {ARGS_A} }}\n</tool_call>\n'
          f'{CALL_OPEN}\n{{"name": "search", "arguments": {ARGS_B}}}\n</tool_call>\n')


def merged(events):
    """Events with consecutive text, and consecutive fragments of one call, joined."""
    out = []
    for event in events:
        if out and event[0] == "text" and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + event[1])
        elif out and event[0] == "arguments" and out[-1][0] == "arguments" and out[-1][1] == event[1]:
            out[-1] = ("arguments", event[1], out[-1][2] + event[2])
        else:
            out.append(event)
    return out


def parse(pieces):
    parser = ToolCallParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return merged(events + parser.finish()), parser


EXPECTED = [("text", "Let me look that up."), ("call", 0, "get_weather"), ("arguments", 0, ARGS_A),
            ("call", 1, "search"), ("arguments", 1, ARGS_B)]


def test_text_then_two_calls():
    events, parser = parse([OUTPUT])
    assert events == EXPECTED
    assert parser.calls_made == 2
    assert json.loads(events[2][2]) == json.loads(ARGS_A)


def test_every_split_gives_the_same_events():
    assert parse(list(OUTPUT))[0] == EXPECTED
    for cut in range(len(OUTPUT) + 1):
        assert parse([OUTPUT[:cut], OUTPUT[cut:]])[0] == EXPECTED
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(OUTPUT)), rng.randint(1, 12)))
        pieces = [OUTPUT[a:b] for a, b in zip([0, *cuts], [*cuts, len(OUTPUT)])]
        assert parse(pieces)[0] == EXPECTED


def test_a_call_is_announced_before_its_arguments_are_complete():
    parser = ToolCallParser()
    events = parser.feed(f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Pa')
    assert events == [("call", 0, "get_weather"), ("arguments", 0, '{"city": "Pa')]
    assert parser.feed('ris"}}\n</tool_call>') == [("arguments", 0, 'ris"}')]


def test_a_partial_open_tag_is_held_back_then_released_as_text():
    parser = ToolCallParser()
    assert parser.feed("a <tool_c") == [("text", "a")]
    assert parser.feed("at> b") == [("text", " <tool_cat> b")]
    assert parser.finish() == []
    parser = ToolCallParser()
    assert parser.feed("ends <tool") == [("text", "ends")]
    assert parser.finish() == [("text", " <tool")]


@pytest.mark.parametrize("text", [
    "<tool_call>\nnonsense",
    '<tool_call>\n{"name": 3}',
    '<tool_call>{"name": "x", "args": {}}',
    "plain answer, no calls at all",
])
def test_text_not_in_the_format_stays_text(text):
    events, parser = parse(list(text))
    assert events == [("text", text)]
    assert parser.calls_made == 0


def test_whitespace_next_to_calls_is_dropped_and_text_after_a_call_kept():
    text = "  \n" + call_block("search", "{}") + "\n\n" + call_block("search", '{"q": 1}') + "\n Done. "
    events, _ = parse([text])
    assert events == [("call", 0, "search"), ("arguments", 0, "{}"), ("call", 1, "search"),
                      ("arguments", 1, '{"q": 1}'), ("text", "Done.")]
    assert parse(["  "])[0] == [("text", "  ")]


def test_call_block_is_the_format_the_grammar_enforces():
    assert call_block("f", '{"a":1}') == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert call_block("f", "not json") == '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'


# -- prompts -------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"sky": "rain"}'},
]


def test_tools_prompt_says_what_is_required():
    assert "must answer by calling one" in tools_prompt([WEATHER], "required", True)
    assert '"get_weather"' in tools_prompt([WEATHER], {"name": "get_weather"}, False)
    text = tools_prompt([WEATHER, SEARCH], "auto", True)
    assert '"name": "get_weather"' in text and '"required": ["city"]' in text and CALL_OPEN in text


def test_generic_path_puts_tools_in_the_system_message_and_renders_history():
    messages, tools = prepare_messages(HISTORY, [WEATHER], "auto", True, template_uses_tools=False)
    assert tools is None
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "get_weather" in messages[0]["content"]
    assert messages[2]["content"] == (call_block("get_weather", '{"city": "Paris"}') + "\n"
                                      + call_block("get_weather", '{"city": "Rome"}'))
    assert messages[3]["content"] == ('<tool_response>\n{"name": "get_weather", "content": "sunny, 21 C"}\n'
                                      '</tool_response>\n<tool_response>\n{"name": "get_weather", "content": '
                                      '{"sky": "rain"}}\n</tool_response>')
    assert all(set(m) == {"role", "content"} for m in messages)
    with_system, _ = prepare_messages([{"role": "system", "content": "Be brief."}, *HISTORY], [WEATHER],
                                      "required", False, template_uses_tools=False)
    assert with_system[0]["content"].startswith("Be brief.\n\n# Tools")
    assert [m["role"] for m in with_system] == ["system", "user", "assistant", "user"]


def test_generic_path_through_smollm2s_template():
    from worker.model import LoadedModel
    source = LoadedModel(str(CHAT_PATH), n_ctx=256, n_batch=64, n_seq_max=1, threads=1).chat_template()
    assert not template_uses_tools(source)
    template = ChatTemplate(source, bos_token="", eos_token="")
    messages, tools = prepare_messages(HISTORY, [WEATHER], "auto", True, template_uses_tools=False)
    pieces = template.render_pieces(messages, tools)
    text = "".join(p.text for p in pieces)
    assert "<|im_start|>system\n# Tools" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>" in text
    assert not any(p.markup and "tool_call" in p.text for p in pieces)  # contents stay contents


TOOLS_TEMPLATE = """{% if tools is defined %}<tools>{% for t in tools %}\
[{{ t.function.name }}: {{ t.function.description }}]{% endfor %}</tools>
{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}\
{% if m.tool_calls is defined %}{% for c in m.tool_calls %}(call {{ c.id }} {{ c.function.name }} \
{{ c.function.arguments | tojson }}){% endfor %}{% endif %}\
{% if m.role == 'tool' %}(result of {{ m.tool_call_id }} {{ m.name }}){% endif %}</{{ m.role }}>
{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_path_gives_the_template_openai_shapes():
    assert template_uses_tools(TOOLS_TEMPLATE)
    messages, tools = prepare_messages(HISTORY, [WEATHER, SEARCH], "auto", True, template_uses_tools=True)
    assert tools[0] == {"type": "function", "function": WEATHER}
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert messages[1]["tool_calls"][0] == {"id": "call_1", "type": "function",
                                            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1",
                           "name": "get_weather"}
    template = ChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="")
    text = "".join(p.text for p in template.render_pieces(messages, tools))
    assert text.startswith("<tools>[get_weather: Weather in a city][search: Search the web]</tools>\n")
    assert '(call call_1 get_weather {"city": "Paris"})(call call_2 get_weather {"city": "Rome"})' in text
    assert "<tool>sunny, 21 C(result of call_1 get_weather)</tool>" in text
    assert "<tools>" not in template.render(messages)  # no tools: the variable stays undefined


def test_a_choice_ends_at_a_repeated_call_and_at_the_most_calls():
    from worker import protocol as ewp
    from worker.chat_output import ChoiceOutput
    from worker.tool_calls import call_block
    out = ChoiceOutput(0, [], tools=True)
    bodies = out.feed(call_block("f", '{"a": 1}').encode() + b"\n")
    bodies += out.feed(call_block("f", '{"a": 2}').encode() + b"\n")
    assert not out.stopped
    bodies += out.feed(call_block("f", '{"a": 1}').encode())
    assert out.stopped
    bodies += out.finish("stop")
    starts = [b["tool_call"]["name"] for b in bodies if "name" in b.get("tool_call", {})]
    assert starts == ["f", "f"] and bodies[-1]["finish_reason"] == "tool_calls"
    many = ChoiceOutput(0, [], tools=True)
    for k in range(ewp.MAX_TOOL_CALLS + 1):
        many.feed(call_block("f", f'{{"a": {k}}}').encode() + b"\n")
    assert many.stopped
    sent = [b for b in many.finish("stop")]
    assert all(b.get("tool_call", {}).get("index", 0) < ewp.MAX_TOOL_CALLS for b in sent)


def test_a_call_cut_short_before_its_name_is_whole_is_not_content():
    parser = ToolCallParser()
    events = parser.feed('Sure. <tool_call>\n{"name": "sea') + parser.finish()
    assert events == [("text", "Sure.")]
