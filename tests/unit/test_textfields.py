"""Which request fields reach the model: every path of each endpoint's spec finds its text, a
changed text is written back where it came from, and a field that cannot be read names itself."""

from __future__ import annotations

import pytest

from serving.gateway.textfields import CHAT, COMPLETIONS, Unscannable, choice_texts, request_slots

MARK = "zebra"

# One body per spec path with MARK in that field only: a path added to the spec needs a line here.
SAMPLES = {
    CHAT: {
        "messages[].role": {"messages": [{"role": MARK, "content": "x"}]},
        "messages[].content": {"messages": [{"role": "user", "content": MARK}]},
        "messages[].content[]": {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": MARK}]}]},
        "messages[].name": {"messages": [{"role": "user", "name": MARK}]},
        "messages[].reasoning": {"messages": [{"role": "assistant", "reasoning": MARK}]},
        "messages[].reasoning_content": {"messages": [{"role": "assistant", "reasoning_content": MARK}]},
        "messages[].tool_calls[].function.name": {
            "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": MARK}}]}]
        },
        "messages[].tool_calls[].function.arguments": {
            "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {"deep": [{"k": MARK}]}}}]}]
        },
        "messages[].tool_call_id": {"messages": [{"role": "tool", "tool_call_id": MARK}]},
        "messages[].task": {"messages": [{"role": "user", "task": MARK}]},
        "messages[].tools": {"messages": [{"role": "developer", "tools": [{"function": {"description": MARK}}]}]},
        "tools[].function": {"tools": [{"type": "function", "function": {"parameters": {"properties": {MARK: {}}}}}]},
        "documents": {"documents": [{"text": MARK}]},
        "chat_template": {"chat_template": MARK},
        "chat_template_kwargs": {"chat_template_kwargs": {"x": MARK}},
    },
    COMPLETIONS: {
        "prompt": {"prompt": ["a", MARK]},
        "suffix": {"suffix": MARK},
    },
}


def texts(endpoint, payload, tokenizer=None) -> list[str]:
    return [get() for get, _ in request_slots(endpoint, payload, tokenizer)]


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_every_field_of_the_spec_is_read(endpoint):
    readable = {path for path, kind in endpoint.request if kind != "opaque"}
    assert set(SAMPLES[endpoint]) == readable  # each spec line has its sample
    for path, payload in SAMPLES[endpoint].items():
        assert MARK in texts(endpoint, payload), path


def test_a_changed_text_goes_back_where_it_came_from_keys_included():
    payload = {
        "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "a"}, "b"]}],
        "tools": [{"function": {"parameters": {"properties": {"c": {"description": "d"}}}}}],
    }
    slots = request_slots(CHAT, payload)
    for get, put in slots:
        put(get().upper())
    assert payload == {
        "messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "A"}, "B"]}],
        "tools": [{"function": {"PARAMETERS": {"PROPERTIES": {"C": {"DESCRIPTION": "D"}}}}}],
    }


def test_standard_roles_media_and_part_types_are_not_read_as_text():
    payload = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}, "uuid": "u1"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ],
            }
        ]
    }
    assert texts(CHAT, payload) == []


def test_a_json_value_nested_deeper_than_the_stack_is_read():
    value: dict = {"k": MARK}
    for _ in range(100_000):
        value = {"k": [value]}
    assert MARK in texts(CHAT, {"chat_template_kwargs": value})


def test_token_ids_need_a_tokenizer_and_fields_that_cannot_be_read_are_named():
    with pytest.raises(Unscannable) as e:
        request_slots(COMPLETIONS, {"prompt": [["a"], [1, 2]]})
    assert e.value.param == "prompt[0]"
    with pytest.raises(Unscannable) as e:
        request_slots(COMPLETIONS, {"prompt": [1, 2]})
    assert e.value.param == "prompt"
    for part in ({"type": "prompt_embeds", "data": "AAAA"}, {"prompt_embeds": True, "data": "AAAA"}):
        with pytest.raises(Unscannable) as e:
            request_slots(CHAT, {"messages": [{"role": "user", "content": ["x", part]}]})
        assert e.value.param == "messages[0].content[1].type"


def test_the_response_fields_of_a_chat_choice():
    choice = {
        "index": 0,
        "delta": {
            "role": "assistant",
            "content": "a",
            "refusal": "b",
            "reasoning": "c",
            "tool_calls": [{"index": 3, "id": "x", "function": {"name": "f", "arguments": "{"}}],
        },
    }
    assert [(name, holder[key]) for holder, key, name in choice_texts(CHAT, choice, "delta")] == [
        ("content", "a"),
        ("refusal", "b"),
        ("reasoning", "c"),
        (("tool_calls", 3, "arguments"), "{"),
        (("tool_calls", 3, "name"), "f"),
    ]
