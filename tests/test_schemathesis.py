"""The served OpenAPI document, fuzzed by schemathesis: every operation, its path parameters and
every header it declares (Authorization, Range, Prefer, X-Request-ID, Origin), with valid values
and invalid ones. No answer may be a 5xx, and every answer must keep to the document (documented
status codes, content types and bodies); invalid data must be refused. The Python API drives it
(its pytest plugin does not run under pytest 9).

Left out: schemathesis's "valid data is accepted" check. The document can say that `image` is a
file, not that it is a photo with a face, so schema-valid uploads are rightly refused (415/422)."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "k1"
EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("keys", [[], [KEY]], ids=["open", "keys"])
def test_the_api_keeps_to_its_document(make_client, keys, mode):
    client, _ = make_client(api_keys=keys, rate_limit_per_s=1000.0)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", client.application)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    fuzzed = []
    for operation in operations:
        @EXAMPLES
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])
        try:
            run()
            fuzzed.append(operation.label)
        except Unsatisfiable:          # nothing in it can be made invalid (e.g. GET /health's free-text headers)
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert "POST /api/sonic/generate" in fuzzed and "GET /output/{name}" in fuzzed, fuzzed
