"""Schemathesis over the server's own /openapi.json, against the hostile-input server: requests
generated from the schema (valid ones and invalid ones) never get a 5xx, every answer has a
status, a content type, headers and a body the schema documents for it, and what the schema
says is invalid is refused.

Bounded: a few examples per operation, replies cut to a few tokens (the fuzzing is of the HTTP
surface, not of generation), so the whole run takes a minute or two on two cores.
"""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers.server import make_client

EXAMPLES_PER_OPERATION = 12
# Fields that make a request run longer, and the most each may ask for here.
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n_predict": 4, "min_tokens": 2, "min_new_tokens": 2,
        "n": 2, "best_of": 2, "max_output_tokens": 4, "request_output_len": 4}
# The generating routes, and the field that bounds each one's reply.
GENERATING = {"/v1/chat/completions": "max_tokens", "/v1/completions": "max_tokens", "/completion": "max_tokens",
              "/infill": "max_tokens", "/v1/responses": "max_output_tokens", "/v1/chat/interactive": "request_output_len"}


# The schema as the app makes it (it depends on the routes only), read when the tests are
# collected: schemathesis' fixture-based loading does not run under pytest 9. The first test
# checks that the server serves this very schema.
SCHEMA = make_client().app.openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)


def test_the_schema_fuzzed_is_the_servers(hostile_server):
    assert httpx.get(f"{hostile_server['url']}/openapi.json").json() == SCHEMA


def capped(path: str, body, negative: bool):
    """`body` with the fields above held to their caps (only numbers over them are changed, and
    not in a `negative` body: that could make it valid), and a generation that says no length
    (the rest of the context) given a short one."""
    if not isinstance(body, dict):
        return body
    if not negative:
        # a whole float is an integer too (2.0 is 2): capped alike
        body = {key: CAPS[key] if key in CAPS and type(value) in (int, float) and value > CAPS[key] else value
                for key, value in body.items()}
    length = GENERATING.get(path)
    if length is not None and body.get(length) is None and body.get("n_predict") in (None, -1):
        body = {**body, length: CAPS[length]}
    return body


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_api_keeps_to_its_schema(case, hostile_server):
    negative = case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
    case.body = capped(case.operation.path, case.body, negative)
    case.call_and_validate(base_url=hostile_server["url"], timeout=60,
                           checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                   response_headers_conformance, response_schema_conformance,
                                   negative_data_rejection])
