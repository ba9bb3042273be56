"""keel bench's datasets and load generator, against a fake OpenAI-compatible SSE server."""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path

import pytest

from serving.bench.datasets import BenchRequest, length_range, make_requests, read_sharegpt
from serving.bench.loadgen import arrival_times, run_point, warmup
from serving.bench.metrics import summarize
from serving.bench.spec import DatasetSpec, LoadSpec
from serving.bench.stack import free_port
from tests.unit.fake_openai import CHUNKS, USAGE_PROMPT_TOKENS, FakeOpenAI

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / ".keel" / "models" / "demo-tiny" / "tokenizer.json"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture(scope="module")
def demo_tokenizer():
    if not DEMO_TOKENIZER.is_file():
        pytest.skip(f"{DEMO_TOKENIZER} is missing (build the demo model)")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO_TOKENIZER))


def load(**kw) -> LoadSpec:
    return LoadSpec(**{"levels": [1], **kw})


def reqs(*prompts: str, max_tokens: int = 7) -> list[BenchRequest]:
    return [BenchRequest(p, 3, max_tokens) for p in prompts]


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --- run_point ---------------------------------------------------------------------------------------


def test_records_take_token_counts_from_usage_and_time_text_chunks():
    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("a", "b", "c"), load(), 1)

    records, duration = run(go())
    assert len(records) == 3
    for r in records:
        assert r.ok and r.status == 200 and r.error == ""
        assert r.output_tokens == 7 and r.prompt_tokens == USAGE_PROMPT_TOKENS
        assert len(r.itl) == CHUNKS - 1  # the role chunk carries no text
        assert all(gap > 0 for gap in r.itl)  # chunks written apart are read apart
        assert 0 < r.ttft <= r.e2el
        assert r.start >= 0
    assert duration >= max(r.e2el for r in records)


def test_an_answer_read_at_once_has_every_gap_zero_and_ttft_at_its_end():
    """The tiny model's bimodal mode (benchmarks/README.md): a whole answer in one read. Its
    inter-token gaps are 0, not missing and not negative, and TPOT is about 0: what vLLM bench
    reports for the same stream."""

    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("a #onewrite"), load(), 1)

    records, duration = run(go())
    [r] = records
    assert r.ok and r.output_tokens == 7 and r.prompt_tokens == USAGE_PROMPT_TOKENS
    assert r.itl == [0.0] * (CHUNKS - 1)
    assert 0 < r.ttft <= r.e2el
    m = summarize(records, duration)
    assert m["mean_itl_ms"] == m["p99_itl_ms"] == 0
    assert m["mean_tpot_ms"] == (r.e2el - r.ttft) / 6 * 1000


def test_counts_fall_back_to_text_chunks_and_dataset_without_usage():
    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("a #nousage"), load(), 1)

    [r], _ = run(go())
    assert r.ok and r.output_tokens == CHUNKS and r.prompt_tokens == 3


def test_http_errors_keep_status_and_message_in_request_order():
    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("ok", "x #429", "x #500"), load(), 2)

    (good, quota, crash), _ = run(go())
    assert good.ok
    assert (quota.ok, quota.status, quota.error) == (False, 429, "quota exceeded for tenant t1")
    assert (crash.ok, crash.status, crash.error) == (False, 500, "Internal Server Error")


@pytest.mark.parametrize("marker, error", [("#error", "engine died"), ("#empty", "empty stream")])
def test_a_200_stream_with_an_error_event_or_no_output_fails_the_request(marker, error):
    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs(f"x {marker}"), load(), 1)

    [r], _ = run(go())
    assert (r.ok, r.status, r.error) == (False, 200, error)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_of_tokens_that_decode_to_no_text_succeeds_timed_by_its_chunks(endpoint):
    """What vLLM streams when greedy decoding repeats a token that is a lone UTF-8 byte: empty
    deltas, then usage with the tokens generated. vLLM bench counts it; so does Keel's, with
    TTFT at the first chunk with choices. Without usage nothing shows it generated anything."""

    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("a #blank", "b #blank #nousage"), load(endpoint=endpoint), 1)

    (blank, unknown), duration = run(go())
    assert (blank.ok, blank.error, blank.output_tokens, blank.prompt_tokens) == (True, "", 7, USAGE_PROMPT_TOKENS)
    chunks = CHUNKS + (endpoint == "chat")  # chat's role chunk has choices too
    assert len(blank.itl) == chunks - 1 and all(gap > 0 for gap in blank.itl)
    assert 0 < blank.ttft < blank.e2el
    assert (unknown.ok, unknown.status, unknown.error) == (False, 200, "empty stream")
    m = summarize([blank], duration)
    assert m["completed"] == 1 and m["total_output_tokens"] == 7 and m["mean_ttft_ms"] > 0


def test_transport_failures_have_status_0():
    async def go():
        async with FakeOpenAI() as srv:
            cut = await run_point(srv.url, "demo", reqs("x #drop", "x #refuse"), load(), 2)
            slow = await run_point(srv.url, "demo", reqs("x #slow"), load(request_timeout_s=0.2), 1)
        refused = await run_point(closed_port_url(), "demo", reqs("a"), load(), 1)
        return cut[0] + slow[0] + refused[0]

    records = run(go())
    assert [(r.ok, r.status) for r in records] == [(False, 0)] * 4
    assert all(r.error for r in records)
    assert "timed out" in records[2].error


def test_concurrency_mode_keeps_level_requests_in_flight_and_no_more():
    async def go():
        async with FakeOpenAI() as srv:
            records, _ = await run_point(
                srv.url, "demo", reqs(*"abcdefghijkl"), load(mode="concurrency", levels=[3]), 3
            )
            return records, srv

    records, srv = run(go())
    assert len(srv.bodies) == 12 and all(r.ok for r in records)
    assert srv.max_in_flight == 3


def test_rate_mode_max_concurrency_caps_in_flight():
    async def go():
        async with FakeOpenAI() as srv:
            spec = load(mode="rate", levels=[1000], max_concurrency=2)
            records, _ = await run_point(srv.url, "demo", reqs(*"abcdefghijkl"), spec, 1000)
            return records, srv

    records, srv = run(go())
    assert len(srv.bodies) == 12 and all(r.ok for r in records)
    assert srv.max_in_flight == 2  # ~50 ms a request: the two slots are used, never a third


def test_request_body_is_vllm_bench_streaming_request():
    async def go():
        async with FakeOpenAI() as srv:
            await run_point(srv.url + "/v1/", "demo", reqs("hi"), load(), 1, api_key="sk-1")
            await run_point(srv.url, "demo", reqs("hi"), load(endpoint="completions"), 1)
            return srv

    srv = run(go())
    chat, completion = srv.bodies
    common = {
        "model": "demo",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    assert chat == {**common, "messages": [{"role": "user", "content": "hi"}]}
    assert completion == {**common, "prompt": "hi"}
    assert srv.auth == ["Bearer sk-1", None]


def test_completions_endpoint_times_text_chunks():
    async def go():
        async with FakeOpenAI() as srv:
            return await run_point(srv.url, "demo", reqs("a"), load(endpoint="completions"), 1)

    [r], _ = run(go())
    assert r.ok and len(r.itl) == CHUNKS - 1 and r.output_tokens == 7


def test_warmup_sends_n_requests_two_at_a_time_and_records_nothing():
    async def go():
        async with FakeOpenAI() as srv:
            failed = await warmup(srv.url, "demo", reqs("a", "b"), 5, None, "chat")
            return failed, srv

    failed, srv = run(go())
    assert failed == 0
    assert [b["messages"][0]["content"] for b in srv.bodies] == ["a", "b", "a", "b", "a"]
    assert srv.max_in_flight == 2  # ~50 ms a request: the two slots are used, never a third


# --- arrival_times -----------------------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0] + times, times)]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrival_gaps_have_mean_one_over_rate_and_cv_one_over_sqrt_burstiness(burstiness):
    g = gaps(arrival_times(20000, 5.0, burstiness, 0.0, seed=7))
    mean = statistics.fmean(g)
    assert mean == pytest.approx(0.2, rel=1e-6)  # scaled so the last request goes at n / rate
    assert statistics.pstdev(g) / mean == pytest.approx(burstiness**-0.5, rel=0.08)
    assert min(g) >= 0


def test_arrival_gaps_after_ramp_up_average_one_over_rate():
    times = arrival_times(20000, 5.0, 1.0, ramp_up_s=20.0, seed=3)
    after = [t for t in times if t > 20.0]
    assert statistics.fmean(gaps(after)[1:]) == pytest.approx(0.2, rel=0.05)


def test_ramp_up_spaces_requests_closer_as_the_rate_rises():
    ramp = 40.0
    times = arrival_times(2000, 10.0, 1.0, ramp_up_s=ramp, seed=1)
    counts = [sum(q * ramp / 4 <= t < (q + 1) * ramp / 4 for t in times) for q in range(4)]
    assert counts == sorted(counts) and len(set(counts)) == 4  # expected 25, 75, 125, 175
    assert times == sorted(times)


def test_arrival_times_are_reproducible_per_seed():
    assert arrival_times(100, 3.0, 0.5, 0.0, seed=1) == arrival_times(100, 3.0, 0.5, 0.0, seed=1)
    assert arrival_times(100, 3.0, 0.5, 0.0, seed=1) != arrival_times(100, 3.0, 0.5, 0.0, seed=2)
    assert arrival_times(0, 3.0, 1.0, 0.0, seed=1) == []


# --- datasets -----------------------------------------------------------------------------------------


def test_length_range_follows_vllm_range_ratio():
    assert length_range(100, 0.1) == (90, 110)
    assert length_range(128, 0.0) == (128, 128)
    assert length_range(1, 0.5) == (1, 2)


def test_random_prompts_have_exact_token_counts_with_the_tokenizer(demo_tokenizer):
    spec = DatasetSpec(kind="random", input_len=60, output_len=16, range_ratio=0.5)
    requests = make_requests(spec, 40, seed=0, tokenizer=demo_tokenizer)
    for r in requests:
        assert r.prompt_tokens == len(demo_tokenizer.encode(r.prompt, add_special_tokens=False).ids)
        assert 30 <= r.prompt_tokens <= 90 and 8 <= r.max_tokens <= 24
    fixed = make_requests(DatasetSpec(input_len=33), 10, seed=1, tokenizer=demo_tokenizer)
    assert [len(demo_tokenizer.encode(r.prompt, add_special_tokens=False).ids) for r in fixed] == [33] * 10


def test_random_lengths_cover_the_range_ratio_bounds_without_a_tokenizer():
    spec = DatasetSpec(kind="random", input_len=10, output_len=20, range_ratio=0.5)
    requests = make_requests(spec, 400, seed=0)
    words = {len(r.prompt.split()) for r in requests}
    outputs = {r.max_tokens for r in requests}
    assert min(words) == 5 and max(words) == 15
    assert min(outputs) == 10 and max(outputs) == 30
    assert all(r.prompt_tokens is None for r in requests)


def test_random_requests_are_reproducible_and_distinct(demo_tokenizer):
    spec = DatasetSpec(kind="random", input_len=8, output_len=4, range_ratio=0.25)
    for tokenizer in (None, demo_tokenizer):
        a = make_requests(spec, 300, seed=5, tokenizer=tokenizer)
        assert a == make_requests(spec, 300, seed=5, tokenizer=tokenizer)
        assert a != make_requests(spec, 300, seed=6, tokenizer=tokenizer)
        assert len({r.prompt for r in a}) == 300
        assert make_requests(spec, 10, seed=5, tokenizer=tokenizer) == a[:10]


def test_shared_prefix_requests_share_their_prefix_tokens(demo_tokenizer):
    spec = DatasetSpec(kind="shared_prefix", prefix_len=40, num_prefixes=3, input_len=12, output_len=8)
    requests = make_requests(spec, 12, seed=0, tokenizer=demo_tokenizer)
    ids = [demo_tokenizer.encode(r.prompt, add_special_tokens=False).ids for r in requests]
    for i, r in enumerate(requests):
        assert r.prompt_tokens == len(ids[i]) == 52
        assert ids[i][:40] == ids[i % 3][:40]
        assert r.prompt.startswith(requests[i % 3].prompt[: len(demo_tokenizer.decode(ids[i][:40]))])
    assert len({tuple(x[:40]) for x in ids}) == 3
    assert len({r.prompt for r in requests}) == 12

    plain = make_requests(spec, 6, seed=0)
    assert plain[0].prompt.split()[:40] == plain[3].prompt.split()[:40]
    assert plain[0].prompt.split()[:40] != plain[1].prompt.split()[:40]
    assert all(len(r.prompt.split()) == 52 for r in plain)


def write_sharegpt(tmp_path: Path, data) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


CONVERSATIONS = [
    {
        "id": "1",
        "conversations": [
            {"from": "human", "value": "what is a good name for a cat"},
            {"from": "gpt", "value": "call it whiskers or maybe mittens please"},
        ],
    },
    {"id": "2", "conversations": [{"from": "human", "value": "only one turn here"}]},
    {
        "id": "3",
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "tell me a very short story"},
            {"from": "gpt", "value": "once upon a time it ended"},
            {"from": "human", "value": "another"},
        ],
    },
    {"id": "4"},
    {
        "id": "5",
        "conversations": [
            {"from": "human", "value": "one two three four five"},
            {"from": "human", "value": "no answer follows this"},
        ],
    },
]


def test_sharegpt_takes_first_human_turn_and_answer_length(tmp_path, demo_tokenizer):
    path = write_sharegpt(tmp_path, CONVERSATIONS)
    assert sorted(read_sharegpt(path)) == [
        ("tell me a very short story", "once upon a time it ended"),
        ("what is a good name for a cat", "call it whiskers or maybe mittens please"),
    ]
    spec = DatasetSpec(kind="sharegpt", path=str(path), output_len_from_dataset=True)
    requests = make_requests(spec, 5, seed=0)  # two usable conversations, cycled
    assert {r.prompt for r in requests} == {"what is a good name for a cat", "tell me a very short story"}
    assert requests[:2] == requests[2:4] and requests[4] == requests[0]
    assert {(r.prompt, r.max_tokens, r.prompt_tokens) for r in requests} == {
        ("what is a good name for a cat", 7, None),
        ("tell me a very short story", 6, None),
    }
    assert requests == make_requests(spec, 5, seed=0)

    counted = make_requests(spec, 2, seed=0, tokenizer=demo_tokenizer)
    for r in counted:
        assert r.prompt_tokens == len(demo_tokenizer.encode(r.prompt, add_special_tokens=False).ids)
    fixed = make_requests(DatasetSpec(kind="sharegpt", path=str(path), output_len=50), 2, seed=0)
    assert [r.max_tokens for r in fixed] == [50, 50]


@pytest.mark.parametrize(
    "data, problem",
    [
        (None, "no such ShareGPT file"),
        ("{not json", "not valid JSON"),
        ({"conversations": []}, "JSON list of conversations"),
        ([["human", "hi"]], "entry 0 is a list"),
        ([{"conversations": "hi"}], 'entry 0: "conversations" must be a list'),
        ([CONVERSATIONS[0], {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}], "entry 1, turn 0"),
        ([CONVERSATIONS[1]], "no conversation has a human turn followed by a gpt turn"),
    ],
)
def test_sharegpt_file_problems_name_the_path_and_what_is_wrong(tmp_path, data, problem):
    path = tmp_path / "missing.json" if data is None else write_sharegpt(tmp_path, data)
    with pytest.raises(ValueError) as e:
        make_requests(DatasetSpec(kind="sharegpt", path=str(path)), 4, seed=0)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_the_one_point_front_end_used_by_compare_summarises_with_vllm_field_names():
    from benchmarks.loadgen import run_load

    async def go():
        async with FakeOpenAI() as srv:
            return await run_load(
                srv.url, "demo", concurrency=2, num_requests=6, max_tokens=7, prompt_words=5, api_key="k"
            ), srv

    summary, srv = run(go())
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["concurrency"] == 2
    assert summary["total_output_tokens"] == 6 * 7
    assert summary["median_ttft_ms"] > 0 and summary["median_tpot_ms"] > 0 and summary["output_throughput"] > 0
    assert srv.max_in_flight == 2 and all(b["max_tokens"] == 7 for b in srv.bodies)
