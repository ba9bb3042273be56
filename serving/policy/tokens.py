"""Prompt token counting in the gateway, with the model's own tokenizer and chat template.

Quotas and the max-prompt-tokens guardrail need the number the engine will report as
`prompt_tokens`, before the request reaches the engine. vLLM's OpenAI server renders a chat with
transformers' `apply_chat_template` on the model's tokenizer (vllm/renderers/hf.py,
safe_apply_chat_template) and encodes the text without adding special tokens again; a
completion prompt is encoded with them. This calls the same transformers function on the same
tokenizer files, so the template, its sandbox, its globals and its choice among named templates
are transformers' own.

vLLM's renderer itself is not called: it needs vLLM's ModelConfig, and importing it costs a
gateway process ~19 s and ~575 MiB (torch, vLLM's config and multimodal packages), while vLLM
is an engine extra the gateway need not have. transformers' generic fast tokenizer
(PreTrainedTokenizerFast) is loaded, not AutoTokenizer, whose import brings torch in
(~6.7 s, ~240 MiB). Measured side by side by `benchmarks/token_count.py`.

What vLLM does to an OpenAI request before it calls the template is taken from its documented
behaviour, not copied: content parts are joined with "\\n" for templates that treat content as
a string and kept as OpenAI parts for templates that loop over them (vLLM's
`--chat-template-content-format auto`); `developer` is sent as `system` to templates that do
not know it; assistant tool-call arguments go to the template as objects. A template that fails
to render (or a malformed chat) falls back to an estimate, never raises: the engine's own count
settles the quota and goes to the audit log either way.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import regex
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Estimate for a chat the template cannot render: role markers and separators per message.
FALLBACK_TOKENS_PER_MESSAGE = 4
# How vLLM's `auto` content format tells a template that loops over message content parts.
_LOOPS_OVER_CONTENT = re.compile(r"\{%-?\s*for\s+\w+\s+in\s+[^%]*\bcontent\b")

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
        hf_tokenizer: PreTrainedTokenizerFast,
        *,
        chat_template: str | None = None,
        default_chat_template_kwargs: dict | None = None,
    ):
        """chat_template / default_chat_template_kwargs: the engine's --chat-template (its text)
        and --default-chat-template-kwargs, when the model is served with them."""
        self._hf = hf_tokenizer
        self._tokenizer: Tokenizer = hf_tokenizer.backend_tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._ascii = _AsciiCounter.for_tokenizer(self._tokenizer)
        self._specials_added = self._tokenizer.num_special_tokens_to_add(False)
        self._chat_template = chat_template
        self._default_template_kwargs = dict(default_chat_template_kwargs or {})
        # A request's chat_template_kwargs reach the template only: never apply_chat_template's
        # own arguments (tokenize, padding, max_length, return_tensors, ...).
        self._reserved_kwargs = frozenset(inspect.signature(hf_tokenizer.apply_chat_template).parameters)
        templates = chat_template if chat_template is not None else hf_tokenizer.chat_template
        sources = templates.values() if isinstance(templates, dict) else [templates or ""]
        self._openai_parts = any(_LOOPS_OVER_CONTENT.search(s) for s in sources)
        # A template knows the role when it compares with it; vLLM checks the same literal.
        self._developer_role = any('"developer"' in s or "'developer'" in s for s in sources)

    @classmethod
    def from_model_dir(
        cls, path: str | Path, *, chat_template: str | None = None, default_chat_template_kwargs: dict | None = None
    ) -> TokenCounter:
        model_dir = Path(path)
        if not (model_dir / "tokenizer.json").is_file():
            raise TokenizerNotFound(
                f"{model_dir}: no tokenizer.json, so prompt tokens cannot be counted for this model "
                "(the directory must hold a HuggingFace fast tokenizer)"
            )
        hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
        return cls(hf_tokenizer, chat_template=chat_template, default_chat_template_kwargs=default_chat_template_kwargs)

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
        # The Rust tokenizer directly: transformers' encode re-sets truncation and padding on it
        # at every call, which is not safe while a worker thread counts with the same tokenizer;
        # encode_batch_fast skips character offsets we never read (a quarter less time per call).
        try:
            return len(self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0])
        except TypeError:  # lone surrogates (valid in JSON, not in UTF-8): count them as U+FFFD
            text = text.encode("utf-8", "replace").decode("utf-8")
            return len(self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0])

    def _render_chat(self, payload: dict, messages: list) -> str:
        variables = {**self._default_template_kwargs, **(payload.get("chat_template_kwargs") or {})}
        variables = {k: v for k, v in variables.items() if k not in self._reserved_kwargs}
        if payload.get("reasoning_effort") is not None:
            variables["reasoning_effort"] = payload["reasoning_effort"]
        text = self._hf.apply_chat_template(
            [self._message(m) for m in messages],
            tools=payload.get("tools"),
            documents=payload.get("documents"),
            chat_template=self._chat_template,
            add_generation_prompt=payload.get("add_generation_prompt", True) is not False,
            continue_final_message=payload.get("continue_final_message", False) is True,
            tokenize=False,
            **variables,
        )
        if not isinstance(text, str):  # a list of chats renders as a batch: not a chat vLLM takes
            raise TypeError("messages must be a list of message objects")
        return text

    def _message(self, message: dict) -> dict:
        """One OpenAI message as vLLM hands it to the template (see the module docstring)."""
        message = dict(message)
        content = message.get("content")
        if isinstance(content, list) and not self._openai_parts:
            message["content"] = "\n".join(p if isinstance(p, str) else p["text"] for p in content if _is_text(p))
        elif isinstance(content, str) and self._openai_parts:
            message["content"] = [{"type": "text", "text": content}]
        if message.get("role") == "developer" and not self._developer_role:
            message["role"] = "system"
        if message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_arguments_as_object(call) for call in message["tool_calls"]]
        return message

    def _estimate_chat(self, payload: dict, messages: list) -> int:
        texts = [_message_text(m) for m in messages if isinstance(m, dict)]
        if payload.get("tools"):
            texts.append(json.dumps(payload["tools"], ensure_ascii=False))
        return self.count_text("\n".join(texts)) + FALLBACK_TOKENS_PER_MESSAGE * len(messages)


def _is_text(part: Any) -> bool:
    return isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text" and "text" in part)


def _arguments_as_object(call: dict) -> dict:
    # Templates read tool-call arguments as an object; OpenAI clients send a JSON string.
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            arguments = {}
    function["arguments"] = arguments if isinstance(arguments, dict) else {}
    return {**call, "function": function}


def _cap(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _truncation_limit(payload: dict) -> int | None:
    # vLLM keeps only the first/last `truncate_prompt_tokens` tokens; -1 (the context size) is left to it.
    limit = payload.get("truncate_prompt_tokens")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 else None


def _message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p if isinstance(p, str) else str(p.get("text") or "") for p in content if isinstance(p, (str, dict))
        )
    return ""
