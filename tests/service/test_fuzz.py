"""Schemathesis against the API's own OpenAPI document: generated requests (bounded) to every
operation, failing on any 5xx, an undocumented status code, or a response that breaks its schema.

Driven through Hypothesis directly (schemathesis' pytest plugin does not load under this pytest).
Not checked: that every schema-valid body is accepted; the knobs' cross-field rules (bits per
method, vector length vs PQ, a model id's form) are the library's, answered 422 with a reason.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.auth import create_key
from service.db import session_factory

EXAMPLES = 12  # per operation
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture
def schema_and_key(settings):
    from service.api.app import create_app

    with session_factory(settings.database_url)() as session:
        key = create_key(session, "fuzz")
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings)), key


def test_no_server_error_and_every_answer_as_documented(schema_and_key: tuple[Any, str]) -> None:
    schema, key = schema_and_key
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)

        fuzz()
