"""Prompt token counting in the gateway, with the model's own tokenizer and chat template.

Quotas and the max-prompt-tokens guardrail need the number the engine will report as
`prompt_tokens`, before the request reaches the engine. This mirrors vLLM's OpenAI server
(vllm/renderers/online_renderer.py, renderers/hf.py, entrypoints/chat_utils.py) and the
transformers chat-template renderer it calls, using the Rust `tokenizers` library and a jinja2
sandbox compiled once; transformers is not imported.

Chat: messages are normalized the way vLLM parses them (content parts joined with "\\n", or kept
as OpenAI parts when the template loops over `message.content`), the template is rendered with
add_generation_prompt (default true), tools, the tokenizer's special tokens and any
`chat_template_kwargs`, and the text is encoded with `add_special_tokens` (default false, as vLLM).
Completions: strings are encoded with `add_special_tokens` (default true, as vLLM); token-id lists
count as their length. A template that fails to render falls back to an estimate, never raises.
"""

from __future__ import annotations

import json
import re
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import regex
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what templates see as bos_token, eos_token, ...
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Estimate for a chat the template cannot render: role markers and separators per message.
FALLBACK_TOKENS_PER_MESSAGE = 4
# Named arguments of transformers' apply_chat_template: vLLM passes them there, not to the template.
_APPLY_CHAT_TEMPLATE_ARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
_MEDIA_PART_MODALITY = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
    "video_embeds": "video",
}
# vLLM keeps a text part's other fields (e.g. cache_control) for templates that read parts.
_KNOWN_PART_FIELDS = frozenset(
    {
        "audio_embeds",
        "audio_url",
        "closed",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "prompt_cache_breakpoint",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
    }
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# The pre-tokenization of the ByteLevel pre-tokenizer with use_regex (GPT-2's pattern, as in
# tokenizers' pre_tokenizers/byte_level.rs).
_GPT2_PIECES = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_ASCII_MAX_CHARS = 4096  # longer texts go to the tokenizer, which releases the GIL (CountTokens
# counts bodies over 8 KiB on a worker thread for that: keep this side of it)
_PIECE_CACHE_SIZE = 65536
# Texts the fast path must count as the tokenizer does before it is used for a model.
_ASCII_PROBES = [
    "Hello there, how are you?",
    "It's, I'm, we've, they'll, she'd, you're, don't 'S 'Re",
    "  leading and trailing   ",
    "tabs\tand\nnew\n\nlines\r\n end \n",
    "x  y   z\t\t w",
    "1234567890 12.5% $3,000 v1.2.3 2024-01-31",
    "!!! ??? ... --- *** ___ ``` ''' \"\"\"",
    "a.b@c.de https://example.com/path?q=1&r=2#frag",
    "CamelCase snake_case kebab-case UPPER",
    "\x00\x01\x0b\x0c\x1c\x1f\x7f control",
    "   ",
    "\n",
    "",
    "'",
    "' s",
    "ab'sx 'll'd'm",
]


class _AsciiCounter:
    """Exact token counts of ASCII text for a byte-level BPE tokenizer, without a tokenizer
    call per text.

    The tokenizer splits a text at its added (special) tokens, cuts each part into pieces with
    GPT-2's pattern, and runs BPE on each piece alone; so the count is the added tokens plus
    each piece's count, and pieces (words, mostly) repeat. Here the split is a regex (the same
    pattern, whose Unicode classes are plain on ASCII), and each piece's count comes from the
    tokenizer's own BPE model the first time it is seen and from a cache after. Used only for
    tokenizers this is exact for, checked against the tokenizer itself on probe texts when the
    model is loaded; other text and other tokenizers go to the tokenizer."""

    def __init__(self, tokenizer: Tokenizer, added: list[str]):
        self._model = tokenizer.model
        # the ByteLevel pre-tokenizer's byte-to-character mapping, without its split
        self._bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str
        longest_first = sorted(added, key=len, reverse=True)  # leftmost-longest, as tokenizers matches them
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")").split if added else None
        self._pieces: dict[str, int] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> _AsciiCounter | None:
        pre, model = tokenizer.pre_tokenizer, tokenizer.model
        if (
            tokenizer.normalizer is not None
            or not isinstance(pre, pre_tokenizers.ByteLevel)
            or pre.add_prefix_space
            or not pre.use_regex
            or not isinstance(model, models.BPE)
            or model.dropout
        ):
            return None
        added = list(tokenizer.get_added_tokens_decoder().values())
        if any(t.single_word or t.lstrip or t.rstrip or not t.content for t in added):
            return None
        fast = cls(tokenizer, [t.content for t in added])
        around = "".join(t.content for t in added[:3])
        probes = _ASCII_PROBES + [around + p + around for p in _ASCII_PROBES[:4]]
        for text in probes:
            if fast.count(text) != len(tokenizer.encode(text, add_special_tokens=False).ids):
                return None
        return fast

    def count(self, text: str) -> int:
        parts = self._split(text) if self._split is not None else [text]
        cache, n = self._pieces, 0
        for i, part in enumerate(parts):
            if i % 2:  # an added token: split puts them at the odd places
                n += 1
                continue
            for piece in _GPT2_PIECES.findall(part):
                c = cache.get(piece)
                if c is None:
                    if len(cache) >= _PIECE_CACHE_SIZE:
                        cache.clear()
                    c = cache[piece] = len(self._model.tokenize(self._bytes(piece)[0][0]))
                n += c
        return n


class TokenizerNotFound(FileNotFoundError):
    """The model directory has no tokenizer.json, so prompts cannot be counted for it."""


class TokenCounter:
    """Counts prompt tokens for one model, as its vLLM engine will count them."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_templates: dict[str, str],
        special_tokens: dict[str, str],
        *,
        default_chat_template_kwargs: dict | None = None,
    ):
        self._tokenizer = tokenizer
        self._ascii = _AsciiCounter.for_tokenizer(tokenizer)
        self._specials_added = tokenizer.num_special_tokens_to_add(False)
        self._default_template_kwargs = dict(default_chat_template_kwargs or {})
        self._special_tokens = dict(special_tokens)
        env = _template_environment()
        self._templates = {name: env.from_string(src) for name, src in chat_templates.items()}
        # Templates that know the `developer` role; for the others it is sent as `system` (vLLM's way).
        self._developer_role = {name: "developer" in src for name, src in chat_templates.items()}
        self._openai_content = {name: _loops_over_content_parts(env, src) for name, src in chat_templates.items()}

    @classmethod
    def from_model_dir(
        cls, path: str | Path, *, chat_template: str | None = None, default_chat_template_kwargs: dict | None = None
    ) -> TokenCounter:
        """chat_template / default_chat_template_kwargs: the engine's --chat-template (its text)
        and --default-chat-template-kwargs, when the model is served with them."""
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerNotFound(
                f"{model_dir}: no tokenizer.json, so prompt tokens cannot be counted for this model "
                "(the directory must hold a HuggingFace fast tokenizer)"
            )
        config_file = model_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        special_tokens = {
            name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None
        }
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        _align_with_transformers(tokenizer, special_tokens)
        templates = {"default": chat_template} if chat_template is not None else _read_chat_templates(model_dir, config)
        return cls(tokenizer, templates, special_tokens, default_chat_template_kwargs=default_chat_template_kwargs)

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (the input guardrails decode token-id prompts with it)."""
        return self._tokenizer

    def count_text(self, text: str) -> int:
        return self._encode(text, add_special_tokens=False)

    def count(self, path: str, payload: dict) -> int:
        return sum(self.count_each(path, payload))

    def count_each(self, path: str, payload: dict) -> list[int]:
        """Prompt tokens of each prompt the engine runs for this request, in its order (a chat
        is one prompt; a completions `prompt` may be several)."""
        endpoint = path.split("?", 1)[0].rstrip("/")
        if endpoint.endswith("/chat/completions"):
            return [self.count_chat(payload)]
        if endpoint.endswith("/completions"):
            return self.count_completion_each(payload)
        raise ValueError(
            f"cannot count prompt tokens for {path!r}: only /v1/chat/completions and /v1/completions have prompts"
        )

    def count_completion(self, payload: dict) -> int:
        return sum(self.count_completion_each(payload))

    def count_completion_each(self, payload: dict) -> list[int]:
        """One count per prompt, split as vLLM's prompt_to_seq splits `prompt`: a string or one
        list of token ids is one prompt; a list of strings or of token-id lists is one each."""
        prompt = payload.get("prompt")
        add_special = payload.get("add_special_tokens", True) is not False
        limit = _truncation_limit(payload)
        if isinstance(prompt, str):
            return [_cap(self._encode(prompt, add_special), limit)]
        if not isinstance(prompt, list) or not prompt:
            return []
        if all(isinstance(t, int) for t in prompt):
            return [_cap(len(prompt), limit)]
        return [
            _cap(self._encode(item, add_special) if isinstance(item, str) else len(item), limit)
            for item in prompt
            if isinstance(item, (str, list))
        ]

    def count_chat(self, payload: dict) -> int:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return 0
        add_special = payload.get("add_special_tokens", False) is True
        try:
            text = self._render_chat(payload, messages)
        except Exception:  # noqa: BLE001 - the engine judges a chat its template rejects; we only estimate it
            return self._estimate_chat(payload, messages)
        return _cap(self._encode(text, add_special), _truncation_limit(payload))

    def _encode(self, text: str, add_special_tokens: bool) -> int:
        if self._ascii is not None and len(text) <= _ASCII_MAX_CHARS and text.isascii():
            n = self._ascii.count(text)
            return n + self._specials_added if add_special_tokens else n
        # encode_batch_fast skips character offsets we never read: a quarter less time per call.
        try:
            return len(self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0])
        except TypeError:  # lone surrogates (valid in JSON, not in UTF-8): count them as U+FFFD
            text = text.encode("utf-8", "replace").decode("utf-8")
            return len(self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0])

    def _render_chat(self, payload: dict, messages: list) -> str:
        template_kwargs = self._template_kwargs(payload)
        tools = template_kwargs.pop("tools", None)
        name = self._template_name(tools)
        conversation = _conversation(
            messages, openai_parts=self._openai_content[name], developer_role=self._developer_role[name]
        )
        add_generation_prompt = bool(template_kwargs.pop("add_generation_prompt", False))
        continue_final = template_kwargs.pop("continue_final_message", False)
        documents = template_kwargs.pop("documents", None)
        variables = {
            **self._special_tokens,
            **{k: v for k, v in template_kwargs.items() if k not in _APPLY_CHAT_TEMPLATE_ARGS},
        }
        if continue_final and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are exclusive")
        if continue_final:
            _tag_final_message(conversation)
        rendered = self._templates[name].render(
            messages=conversation,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if continue_final:
            rendered = _cut_at_tag(rendered)
        return rendered

    def _template_kwargs(self, payload: dict) -> dict:
        """Template arguments merged in vLLM's order; None and "auto" mean "not set" there."""
        request = dict(payload.get("chat_template_kwargs") or {})
        fields = {
            "add_generation_prompt": payload.get("add_generation_prompt", True),
            "continue_final_message": payload.get("continue_final_message", False),
            "documents": payload.get("documents"),
            "reasoning_effort": payload.get("reasoning_effort"),
        }
        if fields["reasoning_effort"] is not None and "enable_thinking" not in request:
            fields["enable_thinking"] = fields["reasoning_effort"] != "none"
        request.update(_set_values(fields))
        defaults = {
            **self._default_template_kwargs,
            **_set_values({"tools": _tools_as_vllm_passes_them(payload.get("tools"))}),
        }
        return {**defaults, **_set_values(request)}

    def _template_name(self, tools: Any) -> str:
        if not self._templates:
            raise LookupError("this model has no chat template")
        if len(self._templates) == 1:
            return next(iter(self._templates))
        if tools is not None and "tool_use" in self._templates:
            return "tool_use"
        return "default"

    def _estimate_chat(self, payload: dict, messages: list) -> int:
        texts = [_message_text(m) for m in messages if isinstance(m, dict)]
        if payload.get("tools"):
            texts.append(json.dumps(payload["tools"], ensure_ascii=False))
        return self.count_text("\n".join(texts)) + FALLBACK_TOKENS_PER_MESSAGE * len(messages)


def _set_values(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None and not (isinstance(v, str) and v == "auto")}


def _cap(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _truncation_limit(payload: dict) -> int | None:
    # vLLM keeps only the first/last `truncate_prompt_tokens` tokens; -1 (the context size) is left to it.
    limit = payload.get("truncate_prompt_tokens")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _align_with_transformers(tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
    """Apply what transformers' fast tokenizer does on load, so ids match what vLLM gets."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(special_tokens.values()) if t not in added]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    # add_bos_token/add_eos_token in the config are ignored: transformers drops them when
    # tokenizer.json exists, and its post-processor alone decides what add_special_tokens adds.


def _read_chat_templates(model_dir: Path, config: dict) -> dict[str, str]:
    """Templates by name, as transformers loads them: chat_template.jinja wins over the config."""
    templates: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").is_file():
        templates["default"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = model_dir / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    configured = config.get("chat_template")
    if isinstance(configured, str):
        return {"default": configured}
    if isinstance(configured, list):
        return {t["name"]: t["template"] for t in configured if isinstance(t, dict)}
    return {}


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox, filters and globals transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja's own tojson, no HTML escaping: the text goes to a model, not a browser.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # Only construction, so a template cannot reach dict's class attributes.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # No dunder or private attributes, so a template cannot reach interpreter internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


# --- content format detection: vLLM's _detect_content_format, on the template's AST ---------------


def _loops_over_content_parts(env: ImmutableSandboxedEnvironment, source: str) -> bool:
    """True when the template iterates message content parts ("openai" format), as vLLM detects it."""
    try:
        ast = env.parse(source)
        next(_content_item_loops(ast))
    except StopIteration:
        return False
    except Exception:  # noqa: BLE001 - vLLM's default when the template cannot be analysed: "string"
        return False
    return True


def _is_var(node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _names_bound_to(root, name: str):
    yield name
    pending = deque([name])
    while pending:
        current = pending.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elems(assign.node, current) and isinstance(assign.target, jinja2.nodes.Name):
                yield assign.target.name
                if assign.target.name != current:
                    pending.append(assign.target.name)


def _message_loop_vars(root):
    message_lists = list(_names_bound_to(root, "messages"))
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(
            _is_var_or_elems(loop.iter, name) for name in message_lists
        ):
            yield loop.target.name


def _content_item_loops(root):
    message_vars = list(_message_loop_vars(root))
    for loop in root.find_all(jinja2.nodes.For):
        if (
            any(_is_var_or_elems(loop.iter, name, "content") for name in message_vars)
            or isinstance(loop.iter, jinja2.nodes.Name)
            and loop.iter.name == "content"
        ):
            yield loop


# --- messages as vLLM hands them to the template --------------------------------------------------


def _conversation(messages: list, *, openai_parts: bool, developer_role: bool) -> list[dict]:
    conversation = [_conversation_message(m, openai_parts) for m in messages]
    if not developer_role and any(m["role"] == "developer" for m in conversation):
        conversation = _developer_as_system(conversation)
    for message in conversation:
        _tool_call_arguments_as_dicts(message)
    # transformers drops None-valued keys and copies reasoning under the names templates read.
    conversation = [{k: v for k, v in m.items() if v is not None} for m in conversation]
    return [_alias_reasoning(m) for m in conversation]


def _conversation_message(message: dict, openai_parts: bool) -> dict:
    role = message["role"]
    content = message.get("content")
    if content is None:
        parts: list = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    else:
        parts = list(content)
    parsed = [p for p in (_content_part(part, openai_parts) for part in parts) if p is not None]
    result: dict[str, Any] = {"role": role, "content": parsed if openai_parts else "\n".join(parsed)}
    if role == "assistant":
        if message.get("tool_calls") is not None:
            result["tool_calls"] = [dict(call) if isinstance(call, dict) else call for call in message["tool_calls"]]
        if message.get("reasoning") is not None:
            result["reasoning"] = result["reasoning_content"] = message["reasoning"]
    elif role == "tool":
        if "tool_call_id" in message:
            result["tool_call_id"] = message["tool_call_id"]
        if isinstance(result["content"], list):
            items = result["content"]
            if all(isinstance(i, dict) and i.get("type") == "text" for i in items):
                texts = [i.get("text", "") for i in items]
                result["content"] = "\n".join(texts) if texts else ""
    if isinstance(message.get("name"), str):
        result["name"] = message["name"]
    if isinstance(message.get("task"), str):
        result["task"] = message["task"]
    if role == "developer":
        result["tools"] = message.get("tools")
    return result


def _content_part(part: Any, openai_parts: bool):
    if isinstance(part, str):
        return {"type": "text", "text": part} if openai_parts else part
    if not isinstance(part, dict):
        raise TypeError("content parts must be strings or objects")
    kind = part.get("type")
    if kind in _TEXT_PART_KEYS:
        text = part.get(_TEXT_PART_KEYS[kind])
        if text is None:
            return None
        if not openai_parts:
            return text
        return {"type": "text", "text": text, **{k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}}
    if kind == "tool_reference":
        return {"type": "tool_reference", "name": part.get("name")} if openai_parts else part.get("name")
    # Media: counted by the engine's processor, not by the text template; keep the placeholder.
    modality = _MEDIA_PART_MODALITY.get(kind) if kind is not None else None
    if openai_parts and modality is not None:
        return {"type": modality}
    return None


def _developer_as_system(conversation: list[dict]) -> list[dict]:
    converted = []
    for message in conversation:
        if message["role"] == "developer":
            message = {**message, "role": "system"}
            message.pop("tools", None)
        converted.append(message)
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if not systems or systems == [0]:
        return converted
    texts = []
    for i in systems:
        content = converted[i].get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p
                for p in content
                if isinstance(p, str) or (isinstance(p, dict) and "text" in p)
            )
        if content:
            texts.append(content)
    return [{"role": "system", "content": "\n\n".join(texts)}, *[m for m in converted if m["role"] != "system"]]


def _tool_call_arguments_as_dicts(message: dict) -> None:
    # Templates expect tool-call arguments as objects; OpenAI clients send JSON strings.
    if message["role"] != "assistant" or not isinstance(message.get("tool_calls"), list):
        return
    if not message["tool_calls"]:
        del message["tool_calls"]
        return
    calls = []
    for call in message["tool_calls"]:
        call = dict(call)
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if not arguments:
            parsed: Any = {}
        elif isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = {}
        else:
            parsed = arguments
        function["arguments"] = parsed if isinstance(parsed, dict) else {}
        call["function"] = function
        calls.append(call)
    message["tool_calls"] = calls


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _tools_as_vllm_passes_them(tools: Any) -> list[dict] | None:
    # vLLM validates tools into pydantic models and dumps them: only known keys, and
    # description/parameters present (as None) even when the client left them out.
    if not isinstance(tools, list):
        return None
    dumped = []
    for tool in tools:
        function = tool.get("function") or {}
        fn = {
            "name": function.get("name"),
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        defer = tool.get("defer_loading")
        if function.get("strict") is not None:
            fn["strict"] = function["strict"]
        fn_defer = function.get("defer_loading")
        if fn_defer is None:
            fn_defer = defer
        if fn_defer is not None:
            fn["defer_loading"] = fn_defer
        entry: dict[str, Any] = {"type": tool.get("type", "function"), "function": fn}
        if defer is not None:
            entry["defer_loading"] = defer
        dumped.append(entry)
    return dumped


def _tag_final_message(conversation: list[dict]) -> None:
    final = conversation[-1]
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_TAG
        return
    for part in reversed(content or []):
        if isinstance(part, dict) and "text" in part:
            part["text"] = part["text"] + _CONTINUE_TAG
            return
    raise ValueError("continue_final_message: the final message has no text to continue")


def _cut_at_tag(rendered: str) -> str:
    at = rendered.rindex(_CONTINUE_TAG.strip())
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p if isinstance(p, str) else str(p.get("text") or "") for p in content if isinstance(p, (str, dict))
        )
    return ""
