"""The rollout's evaluation gate by hand: what an eval file may say (each refusal names the file
and the key), what each expectation accepts and refuses, and how a run counts."""

from __future__ import annotations

import argparse

import pytest
import yaml

from serving.config import ConfigError
from serving.rollout.cli import spec_from_args
from serving.rollout.evaluate import (
    AskFailed,
    EvalError,
    EvalSet,
    Expect,
    answer_text,
    check,
    load_eval_set,
    request_for,
    run_eval,
)
from serving.rollout.spec import RolloutDefaults

CHAT_CASE = {"name": "greets", "messages": [{"role": "user", "content": "Say hello."}], "expect": {"regex": "hello"}}


def write(tmp_path, doc, name="eval.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def test_a_good_file_loads_with_greedy_defaults(tmp_path):
    es = load_eval_set(
        write(
            tmp_path,
            {
                "cases": [
                    CHAT_CASE,
                    {
                        "name": "c",
                        "prompt": "1+1=",
                        "max_tokens": 4,
                        "params": {"stop": ["\n"]},
                        "expect": {"exact": "2"},
                    },
                ]
            },
        )
    )
    assert es.min_pass_rate == 1.0 and es.cases[0].temperature == 0.0 and es.cases[0].max_tokens == 64
    path, body = request_for(es.cases[0], "demo")
    assert path == "/v1/chat/completions" and body["model"] == "demo" and body["messages"][0]["content"] == "Say hello."
    path, body = request_for(es.cases[1], "demo")
    assert path == "/v1/completions" and body["prompt"] == "1+1=" and body["max_tokens"] == 4
    assert body["stop"] == ["\n"]


@pytest.mark.parametrize(
    "case, message",
    [
        ({**CHAT_CASE, "prompt": "x"}, "cases.0: Value error, give exactly one of prompt"),
        ({"name": "n", "expect": {"exact": "x"}}, "give exactly one of prompt"),
        ({**CHAT_CASE, "expect": {}}, "cases.0.expect: Value error, give exactly one of regex, exact, json_schema"),
        ({**CHAT_CASE, "expect": {"regex": "a", "exact": "a"}}, "(got regex, exact)"),
        (
            {**CHAT_CASE, "expect": {"regex": "(unclosed"}},
            "cases.0.expect.regex: Value error, not a regular expression",
        ),
        (
            {**CHAT_CASE, "expect": {"json_schema": {"type": "nonsense"}}},
            "cases.0.expect.json_schema: Value error, not a JSON schema",
        ),
        ({**CHAT_CASE, "max_tokens": 100000}, "cases.0.max_tokens: Input should be less than or equal to 4096"),
        ({**CHAT_CASE, "expected": {"regex": "x"}}, "cases.0.expected: unknown key; did you mean 'expect'"),
        ({**CHAT_CASE, "messages": [{"role": "robot", "content": "x"}]}, "cases.0.messages.0.role"),
        (
            {**CHAT_CASE, "params": {"stream": True, "model": "x"}},
            "cases.0.params: Value error, model, stream: given by",
        ),
    ],
)
def test_a_bad_case_is_refused_naming_the_file_and_key(tmp_path, case, message):
    p = write(tmp_path, {"cases": [case]})
    with pytest.raises(EvalError) as e:
        load_eval_set(p)
    assert str(p) in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "doc, message",
    [
        ("cases: [", "not YAML or JSON"),
        ("- a\n- b\n", "expected a mapping with `cases:`, got list"),
        ({"cases": []}, "cases: List should have at least 1 item"),
        ({"cases": [CHAT_CASE] * 2}, "two cases are named `greets`"),
        ({"cases": [CHAT_CASE], "min_pass_rate": 2}, "min_pass_rate: Input should be less than or equal to 1"),
        ({"cases": [{**CHAT_CASE, "name": f"c{i}"} for i in range(501)]}, "at most 500 items"),
    ],
)
def test_a_bad_file_is_refused(tmp_path, doc, message):
    with pytest.raises(EvalError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_eval_set(write(tmp_path, doc))


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(EvalError, match="nope.yaml: cannot read"):
        load_eval_set(tmp_path / "nope.yaml")


def test_regex_exact_and_json_schema_each_accept_and_refuse():
    assert check(Expect(regex=r"\d+"), "it is 42") is None
    assert check(Expect(regex=r"^\d+$"), "it is 42") == 'no match for /^\\d+$/ in "it is 42"'
    assert check(Expect(exact="Paris"), "  Paris\n") is None
    assert check(Expect(exact="Paris"), "paris") == 'expected "Paris", got "paris"'
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert check(Expect(json_schema=schema), '{"n": 3}') is None
    assert check(Expect(json_schema=schema), '{"n": "3"}') == "JSON at n: '3' is not of type 'integer'"
    assert check(Expect(json_schema=schema), "{}") == "JSON at (top level): 'n' is a required property"
    assert check(Expect(json_schema=schema), "n = 3").startswith("not JSON")
    long = check(Expect(exact="x"), "y" * 500)
    assert long.endswith('..."') and len(long) < 200  # a failure quotes, it does not copy the answer


def test_answer_text_reads_chat_and_completions_and_refuses_the_rest():
    assert answer_text({"choices": [{"message": {"content": "a"}}]}) == "a"
    assert answer_text({"choices": [{"text": "b"}]}) == "b"
    for bad in ({}, {"choices": []}, {"choices": [{"message": {"content": None}}]}, "x"):
        with pytest.raises(ValueError):
            answer_text(bad)


def test_a_run_counts_passes_against_the_pass_rate():
    es = EvalSet.model_validate({"min_pass_rate": 0.6, "cases": [{**CHAT_CASE, "name": f"c{i}"} for i in range(5)]})
    answers = iter(["hello", "hello", "bye", "hello", AskFailed("HTTP 503: no replica")])

    def ask(path, body, timeout):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return {"choices": [{"message": {"content": a}}]}

    r = run_eval(es, "demo", ask)
    assert (r.passed, r.total, r.ok) == (3, 5, True)
    assert [f["case"] for f in r.failures] == ["c2", "c4"] and r.failures[1]["reason"] == "HTTP 503: no replica"
    assert r.summary().startswith("evaluation: 3 of 5 cases passed (needed 60%)")
    r.min_pass_rate = 0.8
    assert not r.ok


def test_the_eval_flag_and_the_configs_default_are_read_at_start(tmp_path):
    p = write(tmp_path, {"cases": [CHAT_CASE]})
    base = {"model": "demo", "to_version": "demo-tiny@v2", "steps": None, "hold": None, "gate": []}
    s = spec_from_args(argparse.Namespace(**base, eval_file=str(p)), RolloutDefaults())
    assert s.evaluation.cases[0].name == "greets" and s.eval_file == str(p)
    s = spec_from_args(argparse.Namespace(**base, eval_file=None), RolloutDefaults(eval_file=str(p)))
    assert s.evaluation is not None
    assert spec_from_args(argparse.Namespace(**base, eval_file=None), RolloutDefaults()).evaluation is None
    with pytest.raises(ConfigError, match="^--eval: .*bad.yaml: cannot read"):
        spec_from_args(argparse.Namespace(**base, eval_file=str(tmp_path / "bad.yaml")), RolloutDefaults())
    with pytest.raises(ConfigError, match="^rollouts.defaults.eval_file: "):
        spec_from_args(argparse.Namespace(**base, eval_file=None), RolloutDefaults(eval_file=str(tmp_path / "x")))
