import json

from serving.errors import GatewayError, error_body, reshape_upstream_error


def test_error_body_is_openai_shaped():
    body = json.loads(error_body(429, "slow down", code="rate_limit_exceeded", request_id="r1"))
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
            "request_id": "r1",
        }
    }
    assert json.loads(GatewayError(404, "nope").body("r"))["error"]["type"] == "not_found_error"


def test_fastapi_validation_errors_become_one_message():
    detail = {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]}
    err = json.loads(reshape_upstream_error(422, json.dumps(detail).encode(), "r"))["error"]
    assert err["message"] == "messages: Field required" and err["param"] == "messages"


def test_unparseable_engine_error_still_gets_a_message():
    err = json.loads(reshape_upstream_error(400, b"<html>", "r"))["error"]
    assert err["message"] == "Bad Request" and err["request_id"] == "r"
