"""schemathesis against the OpenAPI schema of a real `interp serve`, with the database holding a small labelled
catalog: inputs that fit the schema and inputs that break it (negative mode), with and without the write
token; none may make the server answer 5xx. Bounded (max_examples per operation) to stay under a minute."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.api_catalog import WRITE_TOKEN, build_catalog, drop_catalog, server

EXAMPLES = 30       # per operation and mode


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    cat = build_catalog(tmp)
    try:
        with server(tmp / "serve.log", INTERP_API_TOKEN=WRITE_TOKEN) as base:
            yield base, cat
    finally:
        drop_catalog(cat)


@pytest.fixture(scope="module")
def api_schema(live):
    schema = schemathesis.openapi.from_url(live[0] + "/openapi.json")
    schema.config.generation.update(modes=list(schemathesis.GenerationMode), max_examples=EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_answer_5xx(case, live):
    for headers in ({}, {"Authorization": f"Bearer {WRITE_TOKEN}"}):
        response = case.call(base_url=live[0], headers=headers, timeout=30)
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
        if response.status_code >= 400:
            assert response.json()["detail"], response.text
