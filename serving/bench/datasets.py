"""The prompts a load point sends: random, ShareGPT or shared-prefix, as `vllm bench serve` makes them.

    requests = make_requests(spec.dataset, n=64, seed=0, tokenizer=Tokenizer.from_file(...))

With a tokenizer (a `tokenizers.Tokenizer`, e.g. `TokenCounter.from_model_dir(dir)._tokenizer`)
random prompts are random vocabulary tokens decoded to text, and their length is exact: the text
re-encodes (without special tokens) to the number of tokens asked for. The server's
`prompt_tokens` is larger for chat requests (the chat template adds its own tokens).
Without a tokenizer, prompts are words from a fixed list of common English words, one word
roughly one token, and `prompt_tokens` is None (not counted).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.bench.spec import DatasetSpec

# Common English words most tokenizers hold as single tokens (with a leading space).
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "are",
    "be",
    "this",
    "have",
    "not",
    "but",
    "had",
    "they",
    "you",
    "which",
    "one",
    "were",
    "all",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "states",
    "himself",
    "few",
    "house",
    "use",
    "during",
    "without",
    "again",
    "place",
    "around",
    "however",
    "home",
    "small",
    "found",
    "thought",
    "went",
    "say",
    "part",
    "once",
    "general",
    "high",
    "upon",
    "school",
    "every",
    "don",
    "does",
    "got",
    "united",
    "left",
    "number",
    "course",
    "war",
    "until",
    "always",
    "away",
    "something",
    "fact",
    "though",
    "water",
    "less",
    "public",
    "put",
    "think",
    "almost",
    "hand",
    "enough",
    "far",
    "took",
    "head",
    "yet",
    "government",
    "system",
    "better",
    "set",
    "told",
    "nothing",
    "night",
    "end",
    "why",
    "called",
    "didn",
    "eyes",
    "find",
    "going",
    "look",
    "asked",
    "later",
    "knew",
    "point",
    "next",
    "city",
    "give",
    "group",
    "toward",
    "young",
    "let",
    "room",
    "president",
    "side",
    "social",
    "given",
    "present",
    "several",
    "order",
    "national",
    "possible",
    "rather",
    "second",
    "face",
    "per",
    "among",
    "form",
    "important",
    "often",
    "things",
    "looked",
    "early",
    "white",
    "case",
    "john",
    "become",
    "large",
    "big",
    "need",
    "four",
    "within",
    "felt",
    "along",
    "children",
    "saw",
    "best",
    "church",
    "ever",
    "least",
    "power",
    "development",
    "light",
    "thing",
    "seemed",
    "family",
    "interest",
    "want",
    "members",
    "mind",
    "country",
    "area",
    "others",
    "done",
    "turned",
    "although",
    "open",
    "god",
    "service",
    "certain",
    "kind",
    "problem",
    "began",
    "different",
    "door",
    "thus",
    "help",
    "sense",
    "means",
    "whole",
    "matter",
    "perhaps",
    "itself",
    "york",
    "times",
    "law",
    "human",
    "line",
    "above",
    "name",
    "example",
    "action",
    "company",
    "hands",
    "local",
    "show",
    "whether",
    "five",
    "history",
    "gave",
    "today",
    "either",
    "act",
    "feet",
    "across",
    "taken",
    "past",
    "quite",
    "anything",
    "seen",
    "having",
    "death",
    "experience",
    "body",
    "word",
    "half",
    "really",
    "week",
    "field",
    "car",
    "words",
    "already",
    "information",
]
# vLLM's ShareGPT filter (benchmarks/datasets.py is_valid_sequence), so sampled sets compare.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_HUMAN_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant", "chatgpt")
_ADJUST_TRIES = 10  # vLLM's gen_prompt_decode_to_target_len max_retry
_DISTINCT_TRIES = 20


@dataclass
class BenchRequest:
    """One request to send: the prompt text (a chat user message or a completion prompt), its
    token count (text only, no special tokens or chat template; None without a tokenizer) and
    max_tokens, sent with ignore_eos so the server generates exactly that many."""

    prompt: str
    prompt_tokens: int | None
    max_tokens: int


def make_requests(spec: DatasetSpec, n: int, seed: int, tokenizer: Any = None) -> list[BenchRequest]:
    """n requests for the dataset, the same for the same (spec, n, seed, tokenizer). Random and
    shared-prefix requests are drawn one after another, so the first k of n are the k of a smaller
    run. A sharegpt `path` is read as given: resolve it against the spec file first."""
    if n < 0:
        raise ValueError(f"cannot make {n} requests")
    rng = random.Random(seed)
    if spec.kind == "sharegpt":
        return _sharegpt_requests(spec, n, rng, tokenizer)
    text = _TextSampler(tokenizer)
    if spec.kind == "shared_prefix":
        return _shared_prefix_requests(spec, n, rng, text)
    return _random_requests(spec, n, rng, text)


def length_range(length: int, range_ratio: float) -> tuple[int, int]:
    """[low, high] as vLLM's --random-range-ratio: floor(len*(1-r)) .. ceil(len*(1+r)), low >= 1."""
    # The epsilon keeps 100 * 1.1 = 110.00000000000001 from ceiling to 111.
    low = max(1, math.floor(length * (1 - range_ratio) + 1e-9))
    high = max(low, math.ceil(length * (1 + range_ratio) - 1e-9))
    return low, high


def _random_requests(spec: DatasetSpec, n: int, rng: random.Random, text: _TextSampler) -> list[BenchRequest]:
    in_low, in_high = length_range(spec.input_len, spec.range_ratio)
    out_low, out_high = length_range(spec.output_len, spec.range_ratio)
    requests: list[BenchRequest] = []
    seen: set[str] = set()
    for _ in range(n):
        input_len = rng.randint(in_low, in_high)
        max_tokens = rng.randint(out_low, out_high)
        prompt, count = text.distinct(rng, input_len, seen)
        requests.append(BenchRequest(prompt, count, max_tokens))
    return requests


def _shared_prefix_requests(spec: DatasetSpec, n: int, rng: random.Random, text: _TextSampler) -> list[BenchRequest]:
    prefixes: list[str] = []
    for _ in range(spec.num_prefixes):
        prefix, _count = text.distinct(rng, spec.prefix_len, set(prefixes))
        prefixes.append(prefix)
    in_low, in_high = length_range(spec.input_len, spec.range_ratio)
    out_low, out_high = length_range(spec.output_len, spec.range_ratio)
    requests: list[BenchRequest] = []
    seen: set[str] = set()
    for i in range(n):
        prefix = prefixes[i % len(prefixes)]
        suffix_len = rng.randint(in_low, in_high)
        max_tokens = rng.randint(out_low, out_high)
        prompt, count = text.distinct(rng, suffix_len, seen, prefix=prefix, prefix_tokens=spec.prefix_len)
        requests.append(BenchRequest(prompt, count, max_tokens))
    return requests


class _TextSampler:
    """Random text of an exact token count (with a tokenizer) or of n words (without)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        if tokenizer is not None:
            self.ids = _word_token_ids(tokenizer)

    def distinct(
        self, rng: random.Random, length: int, seen: set[str], *, prefix: str = "", prefix_tokens: int = 0
    ) -> tuple[str, int | None]:
        """prefix + random text of `length` tokens, not in `seen` (when the space of texts allows
        it), added to `seen`; with its token count (None without a tokenizer)."""
        for _ in range(_DISTINCT_TRIES):
            prompt, count = self.text(rng, length, prefix, prefix_tokens)
            if prompt not in seen:
                break
        seen.add(prompt)
        return prompt, count

    def text(self, rng: random.Random, length: int, prefix: str = "", prefix_tokens: int = 0) -> tuple[str, int | None]:
        if self.tokenizer is None:
            words = " ".join(rng.choice(WORDS) for _ in range(length))
            return (f"{prefix} {words}" if prefix else words), None
        return self._exact(rng, length, prefix, prefix_tokens)

    def _exact(self, rng: random.Random, length: int, prefix: str, prefix_tokens: int) -> tuple[str, int]:
        # Whole-word tokens re-encode to themselves, so this is exact on the first try for BPE
        # vocabularies; the loop is vLLM's decode/re-encode/adjust for any other tokenizer.
        target = prefix_tokens + length
        ids = [rng.choice(self.ids) for _ in range(length)]
        for _ in range(_ADJUST_TRIES + 1):
            prompt = prefix + self.tokenizer.decode(ids, skip_special_tokens=False)
            count = len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
            if count == target:
                break
            if count < target:
                ids += [rng.choice(self.ids) for _ in range(target - count)]
            else:
                ids = ids[: max(1, len(ids) - (count - target))]
        return prompt, count


def _word_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens that are a space and letters and encode back to themselves; all non-special
    ids when the vocabulary has too few of those."""
    special = set(tokenizer.get_added_tokens_decoder())
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    words = [i for i, t, e in zip(ids, texts, encoded) if t[:1] == " " and t[1:].isalpha() and e.ids == [i]]
    if len(words) >= 64:
        return words
    if not ids:
        raise ValueError("the tokenizer has no ordinary tokens to make prompts from")
    return ids


# --- ShareGPT --------------------------------------------------------------------------------------


def _sharegpt_requests(spec: DatasetSpec, n: int, rng: random.Random, tokenizer: Any) -> list[BenchRequest]:
    path = Path(spec.path or "")
    pairs = read_sharegpt(path)
    rng.shuffle(pairs)
    chosen: list[BenchRequest] = []
    for prompt, answer in pairs:
        if len(chosen) >= n:
            break
        prompt_len = _count(tokenizer, prompt)
        output_len = _count(tokenizer, answer) if spec.output_len_from_dataset else spec.output_len
        if not _valid_sharegpt(prompt_len, output_len, spec.output_len_from_dataset):
            continue
        chosen.append(BenchRequest(prompt, prompt_len if tokenizer is not None else None, output_len))
    if not chosen and n:
        raise ValueError(
            f"{path}: no conversation fits (prompt {SHAREGPT_MIN_LEN}.."
            f"{SHAREGPT_MAX_PROMPT_LEN} tokens, prompt + output <= "
            f"{SHAREGPT_MAX_TOTAL_LEN}, as vLLM bench filters ShareGPT)"
        )
    return [chosen[i % len(chosen)] for i in range(n)]


def read_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn after it) of each conversation in a ShareGPT-format file:
    a JSON list of {"conversations": [{"from": "human"|"gpt", "value": str}, ...]}. Entries without
    `conversations` (as vLLM), with fewer than 2 turns or with no human turn answered are skipped;
    a file that cannot be read or has the wrong shape raises ValueError naming the path and the
    entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such ShareGPT file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the ShareGPT file: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations, not a {type(data).__name__}")
    pairs: list[tuple[str, str]] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f'{path}: entry {index} is a {type(entry).__name__}, not an object with "conversations"')
        turns = entry.get("conversations")
        if turns is None:
            continue
        if not isinstance(turns, list):
            raise ValueError(f'{path}: entry {index}: "conversations" must be a list of {{"from", "value"}} turns')
        for t, turn in enumerate(turns):
            if not (
                isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)
            ):
                raise ValueError(
                    f'{path}: entry {index}, turn {t}: expected {{"from": str, '
                    f'"value": str}}, got {json.dumps(turn)[:80]}'
                )
        if len(turns) < 2:
            continue
        pair = _first_exchange(turns)
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"{path}: no conversation has a human turn followed by a gpt turn")
    return pairs


def _first_exchange(turns: list[dict]) -> tuple[str, str] | None:
    for i, turn in enumerate(turns[:-1]):
        if turn["from"].lower() in _HUMAN_ROLES:
            answer = turns[i + 1]
            if answer["from"].lower() in _ANSWER_ROLES:
                return turn["value"], answer["value"]
            return None
    return None


def _count(tokenizer: Any, text: str) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _valid_sharegpt(prompt_len: int, output_len: int, output_from_dataset: bool) -> bool:
    if prompt_len < SHAREGPT_MIN_LEN or prompt_len > SHAREGPT_MAX_PROMPT_LEN:
        return False
    if output_from_dataset and output_len < SHAREGPT_MIN_LEN:
        return False
    return prompt_len + output_len <= SHAREGPT_MAX_TOTAL_LEN
