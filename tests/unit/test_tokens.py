"""Prompt token counts in the gateway equal what vLLM's engine reports as prompt_tokens.

The reference is transformers, which vLLM calls: apply_chat_template(..., tokenize=True) for chats
(vLLM renders the template and encodes without adding special tokens again) and tokenizer(prompt)
for completions (vLLM encodes completions with add_special_tokens=True).
"""

from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path

import pytest

from serving.demo_model import build_demo_model, is_built
from serving.policy.tokens import TokenCounter, TokenizerNotFound

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / ".keel" / "models" / "demo-tiny"
CORPUS = REPO / "models" / "demo-tiny" / "corpus.txt"

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there, how are you?"},
]
MULTI_TURN = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello! how can I help?"},
    {"role": "user", "content": "tell me a joke about cats, héllo 🙂"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# Loops over content parts, so vLLM hands it OpenAI-style parts; also renders tools and a kwarg.
PARTS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|start|>tools\n{{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}<|start|>{{ message.role }}\n"
    "{% for part in message.content %}[{{ part.text }}]{% endfor %}<|end|>\n{% endfor %}"
    "{% if house_style is defined %}style: {{ house_style }}\n{% endif %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    if is_built(DEMO_DIR, CORPUS):
        return DEMO_DIR
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny", CORPUS)


@pytest.fixture(scope="module")
def counter(demo_dir) -> TokenCounter:
    return TokenCounter.from_model_dir(demo_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def model_copy(demo_dir: Path, tmp_path: Path, *, template: str | None = None, tokenizer_json_edit=None) -> Path:
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_dir / name, copy / name)
    if template is not None:
        (copy / "chat_template.jinja").write_text(template)
    if tokenizer_json_edit is not None:
        data = json.loads((copy / "tokenizer.json").read_text())
        tokenizer_json_edit(data)
        (copy / "tokenizer.json").write_text(json.dumps(data))
    return copy


def hf_chat_tokens(tokenizer, messages, **kwargs) -> int:
    return len(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs)
    )


@pytest.mark.parametrize("messages", [SYSTEM_USER, MULTI_TURN], ids=["system_user", "multi_turn"])
def test_chat_count_equals_the_engine_count(counter, hf_tokenizer, messages):
    assert counter.count_chat({"model": "demo", "messages": messages}) == hf_chat_tokens(hf_tokenizer, messages)


def test_chat_with_list_of_text_parts_counts_the_parts_joined_by_newlines(counter, hf_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]
    joined = [{"role": "user", "content": "part one\npart two"}]
    assert counter.count_chat({"messages": parts}) == hf_chat_tokens(hf_tokenizer, joined)


def test_chat_without_generation_prompt_counts_fewer_tokens(counter, hf_tokenizer):
    payload = {"messages": SYSTEM_USER, "add_generation_prompt": False}
    expected = len(
        hf_tokenizer.apply_chat_template(SYSTEM_USER, add_generation_prompt=False, tokenize=True, return_dict=False)
    )
    assert counter.count_chat(payload) == expected
    assert expected < counter.count_chat({"messages": SYSTEM_USER})


def test_template_that_loops_over_parts_gets_parts_tools_and_kwargs(demo_dir, tmp_path):
    from transformers import AutoTokenizer

    model = model_copy(demo_dir, tmp_path, template=PARTS_TEMPLATE)
    payload = {
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": TOOLS,
        "chat_template_kwargs": {"house_style": "brief"},
    }
    # What vLLM hands the template: string content wrapped as a text part; tools as its
    # pydantic dump (exactly these keys).
    as_vllm_passes_it = [{"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]}]
    expected = hf_chat_tokens(AutoTokenizer.from_pretrained(model), as_vllm_passes_it, tools=TOOLS, house_style="brief")
    counter = TokenCounter.from_model_dir(model)
    assert counter.count_chat(payload) == expected
    assert counter.count_chat({"messages": payload["messages"]}) < expected


def test_completion_string_counts_as_the_tokenizer_encodes_it(counter, hf_tokenizer):
    prompt = "Once upon a time, a tokenizer counted everything."
    assert counter.count_completion({"prompt": prompt}) == len(hf_tokenizer(prompt).input_ids)


def test_completion_forms_are_summed(counter, hf_tokenizer):
    texts = ["a b c", "hello world"]
    assert counter.count_completion({"prompt": texts}) == sum(len(hf_tokenizer(t).input_ids) for t in texts)
    assert counter.count_completion({"prompt": [5, 6, 7, 8]}) == 4
    assert counter.count_completion({"prompt": [[1, 2, 3], [4, 5]]}) == 5


def test_each_prompt_the_engine_runs_is_counted_on_its_own(counter, hf_tokenizer):
    """The context check and the reservation are per prompt: one count per prompt vLLM runs."""
    texts = ["first prompt", "a second, longer prompt here"]
    path = "/v1/completions"
    assert counter.count_each(path, {"prompt": texts}) == [len(hf_tokenizer(t).input_ids) for t in texts]
    assert counter.count_each(path, {"prompt": [5, 6, 7, 8]}) == [4]  # one prompt of token ids
    assert counter.count_each(path, {"prompt": [[1, 2, 3], [4, 5]]}) == [3, 2]
    assert counter.count_each(path, {"prompt": [[1, 2, 3], [4, 5]], "truncate_prompt_tokens": 2}) == [2, 2]
    assert counter.count_each(path, {"prompt": []}) == []
    assert counter.count_each("/v1/chat/completions", {"messages": SYSTEM_USER}) == [
        counter.count_chat({"messages": SYSTEM_USER})
    ]


def test_completion_adds_bos_when_the_tokenizer_does_but_chat_does_not_add_a_second(demo_dir, tmp_path):
    from transformers import AutoTokenizer

    def bos_post_processor(data):
        bos = next(t for t in data["added_tokens"] if t["content"] == "<|begin_of_text|>")
        special = {"SpecialToken": {"id": bos["content"], "type_id": 0}}
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos["content"]: {"id": bos["content"], "ids": [bos["id"]], "tokens": [bos["content"]]}},
        }

    model = model_copy(demo_dir, tmp_path, tokenizer_json_edit=bos_post_processor)
    hf = AutoTokenizer.from_pretrained(model)
    counter = TokenCounter.from_model_dir(model)
    prompt = "Once upon a time"
    assert counter.count_completion({"prompt": prompt}) == len(hf(prompt).input_ids)
    assert counter.count_completion({"prompt": prompt}) == counter.count_text(prompt) + 1
    assert counter.count_completion({"prompt": prompt, "add_special_tokens": False}) == counter.count_text(prompt)
    assert counter.count_chat({"messages": SYSTEM_USER}) == hf_chat_tokens(hf, SYSTEM_USER)


def test_truncate_prompt_tokens_caps_the_count_as_the_engine_truncates(counter):
    prompt = "one two three four five six seven"
    assert counter.count_completion({"prompt": prompt, "truncate_prompt_tokens": 3}) == 3
    assert counter.count_chat({"messages": SYSTEM_USER, "truncate_prompt_tokens": 5}) == 5


def test_template_that_fails_falls_back_to_an_estimate_instead_of_raising(demo_dir, tmp_path):
    strict = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    counter = TokenCounter.from_model_dir(model_copy(demo_dir, tmp_path, template=strict))
    texts = "\n".join(m["content"] for m in SYSTEM_USER)
    estimate = counter.count_chat({"messages": SYSTEM_USER})
    assert estimate >= counter.count_text(texts)
    assert estimate <= counter.count_text(texts) + 10 * len(SYSTEM_USER)


def test_malformed_messages_fall_back_instead_of_raising(counter):
    assert counter.count_chat({"messages": [{"content": "no role here"}]}) > 0


def test_count_dispatches_on_the_endpoint_path(counter):
    chat = {"messages": SYSTEM_USER}
    completion = {"prompt": "Once upon a time"}
    assert counter.count("/v1/chat/completions", chat) == counter.count_chat(chat)
    assert counter.count("/v1/completions", completion) == counter.count_completion(completion)
    with pytest.raises(ValueError, match="/v1/embeddings"):
        counter.count("/v1/embeddings", {"input": "x"})


def test_count_text_has_no_special_tokens(counter, hf_tokenizer):
    text = "plain text, no specials"
    assert counter.count_text(text) == len(hf_tokenizer(text, add_special_tokens=False).input_ids)


def test_model_dir_without_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerNotFound, match=str(tmp_path)) as e:
        TokenCounter.from_model_dir(tmp_path)
    assert "tokenizer.json" in str(e.value)


def _random_ascii(rng, specials: list[str]) -> str:
    words = ["hello", "It's", "we'll", "DON'T", "x", "camelCase", "snake_case", "'s", "'", "''"]
    pieces = [
        lambda: rng.choice(words),
        lambda: "".join(rng.choices(string.digits, k=rng.randint(1, 6))),
        lambda: "".join(rng.choices(string.punctuation, k=rng.randint(1, 4))),
        lambda: "".join(rng.choices(" \t\n\r\x0b\x0c", k=rng.randint(1, 4))),
        lambda: rng.choice(specials),
        lambda: "".join(rng.choices(string.printable + "\x00\x1c\x7f", k=3)),
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randint(0, 12)))


def test_ascii_text_is_counted_as_the_tokenizer_counts_it(counter, demo_dir):
    """The fast path for ASCII text (a regex split, a per-piece cache over the tokenizer's own
    BPE) gives the tokenizer's count, random text and the model's corpus alike."""
    assert counter._ascii is not None  # the demo tokenizer takes it
    tokenizer = counter._tokenizer
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    rng = random.Random(11)
    texts = [_random_ascii(rng, specials) for _ in range(3000)]
    texts += CORPUS.read_text(encoding="utf-8").splitlines()[:2000]
    for text in (t for t in texts if t.isascii()):
        for special in (False, True):
            assert counter._encode(text, special) == len(tokenizer.encode(text, add_special_tokens=special).ids), repr(
                text
            )


def test_tokenizers_the_fast_path_would_miscount_go_to_the_tokenizer(demo_dir, tmp_path):
    def prefix_space(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    def lowercase(spec):
        spec["normalizer"] = {"type": "Lowercase"}

    for i, edit in enumerate((prefix_space, lowercase)):
        (tmp_path / str(i)).mkdir()
        other = TokenCounter.from_model_dir(model_copy(demo_dir, tmp_path / str(i), tokenizer_json_edit=edit))
        assert other._ascii is None
        assert other.count_text("Hello There") == len(
            other._tokenizer.encode("Hello There", add_special_tokens=False).ids
        )


def test_developer_message_counts_as_system_for_a_template_without_that_role(counter, hf_tokenizer):
    developer = [{"role": "developer", "content": "You are terse."}, SYSTEM_USER[1]]
    assert counter.count_chat({"messages": developer}) == hf_chat_tokens(hf_tokenizer, SYSTEM_USER)


def test_tool_call_arguments_reach_the_template_as_objects(demo_dir, tmp_path):
    from transformers import AutoTokenizer

    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for call in m.tool_calls or [] %}{{ call.function.arguments | tojson }}{% endfor %}\n{% endfor %}"
    )
    model = model_copy(demo_dir, tmp_path, template=template)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    as_object = [
        messages[0],
        {**messages[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}]},
    ]
    expected = hf_chat_tokens(AutoTokenizer.from_pretrained(model), as_object)
    assert TokenCounter.from_model_dir(model).count_chat({"messages": messages}) == expected


def test_chat_template_kwargs_cannot_set_how_the_template_is_applied(counter):
    """A client's chat_template_kwargs reach the template, never apply_chat_template's own
    arguments (padding to a huge max_length would cost the gateway memory and time)."""
    plain = counter.count_chat({"messages": SYSTEM_USER})
    hostile = {"tokenize": True, "padding": "max_length", "max_length": 10**9, "return_tensors": "np"}
    assert counter.count_chat({"messages": SYSTEM_USER, "chat_template_kwargs": hostile}) == plain


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": [[{"role": "user", "content": "a batch, not a chat"}]]},
        {"messages": SYSTEM_USER, "chat_template_kwargs": ["not", "an", "object"]},
        {"messages": SYSTEM_USER, "add_generation_prompt": True, "continue_final_message": True},
        {"messages": [{"role": "assistant", "tool_calls": ["not an object"]}]},
    ],
    ids=["batch", "kwargs_list", "exclusive_flags", "bad_tool_call"],
)
def test_chats_the_template_cannot_take_are_estimated_not_raised(counter, payload):
    assert counter.count_chat(payload) >= 0
