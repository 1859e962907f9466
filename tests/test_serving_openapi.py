"""The served /openapi.json tells the truth: a schema-driven fuzzer (schemathesis) sends valid and invalid
requests to every operation of the running app and finds no undocumented status, no body or streamed event
that breaks its schema, no invalid request accepted and no server error."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def fuzz(base_url: str, max_examples: int, headers: dict | None = None) -> tuple[dict, list[str]]:
    """Statuses seen per operation and mode, and the failures schemathesis reports."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    statuses: dict[str, dict[int, int]] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            seen = statuses.setdefault(f"{operation.label} {mode.value}", {})

            # Every check but "schema-valid data is accepted": a valid request may still not fit the model
            # (its context, its vocabulary) or the server's per-request limits, and gets a documented 400.
            @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                try:
                    response = case.call_and_validate(base_url=base_url, headers=headers, timeout=120,
                                                      excluded_checks=[positive_data_acceptance])
                    seen[response.status_code] = seen.get(response.status_code, 0) + 1
                except BaseException as err:  # schemathesis raises groups of failures
                    failures.append(f"{operation.label} ({mode.value}): {str(err)[:600]}")

            try:
                run()
            except Unsatisfiable:  # no invalid request exists for an operation without inputs
                pass
    return statuses, failures


def test_a_schema_driven_fuzzer_finds_nothing_undocumented(serving_app):
    statuses, failures = fuzz(serving_app.base_url, max_examples=25)
    assert failures == []
    # the fuzzer really reached generation, refusals and unknown models
    assert statuses["POST /v1/completions positive"].get(200, 0) > 0
    assert statuses["POST /v1/chat/completions positive"].get(200, 0) > 0
    assert set(statuses["POST /v1/chat/completions negative"]) <= {400, 404}
    secure_statuses, secure_failures = fuzz(f"{serving_app.base_url}/secure", max_examples=3)
    assert secure_failures == []
    assert {401} == set(secure_statuses["GET /v1/models positive"])  # no key: refused, as documented


def test_openapi_documents_400_not_422_and_both_200_bodies(serving_app):
    import httpx

    spec = httpx.get(f"{serving_app.base_url}/openapi.json", timeout=30).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"200", "400", "401", "404", "429", "500", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    ok = spec["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/CompletionResponse")
    assert spec["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == serving_app.models
    assert "HTTPValidationError" not in spec["components"]["schemas"]
