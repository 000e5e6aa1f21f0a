"""The OpenAPI document: 3.1, every route the app serves, schemas from the handlers' models."""

from __future__ import annotations

from typing import Any

from clipservice.api.openapi import registered_operations
from clipservice.api.schemas import CreateClipsRequest, JobCreated, ProblemDetail
from clipservice.jobs.models import Job
from tests.conftest import ServiceFactory


async def _doc(svc: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with svc.http.get(f"{svc.base_url}/api/openapi.json", headers=headers) as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def test_every_route_documented_from_models(make_service: ServiceFactory) -> None:
    """Every served route is described (none undocumented) and body schemas equal the models' own."""
    svc = await make_service()
    doc = await _doc(svc)
    assert doc["openapi"].startswith("3.1")
    served = registered_operations(svc.app)
    ops = [(m.upper(), p) for p, item in doc["paths"].items() for m in item]
    assert sorted(ops) == sorted(served)
    for path, item in doc["paths"].items():
        for op in item.values():
            assert not op["operationId"].startswith("undocumented"), path
            for code, resp in op["responses"].items():
                if int(code) >= 400:
                    schema = resp["content"]["application/problem+json"]["schema"]
                    assert schema["$ref"].endswith("/ProblemDetail")
    schemas = doc["components"]["schemas"]
    for model, mode in (
        (Job, "serialization"),
        (JobCreated, "serialization"),
        (ProblemDetail, "serialization"),
        (CreateClipsRequest, "validation"),
    ):
        own = model.model_json_schema(mode=mode)  # type: ignore[attr-defined]
        assert set(schemas[model.__name__]["properties"]) == set(own["properties"])
    clips = schemas["CreateClipsRequest"]["properties"]["clips"]
    assert clips["maxItems"] == svc.settings.jobs.max_clips_per_job
    create = doc["paths"]["/api/create-clips"]["post"]["responses"]
    assert {"202", "400", "408", "413", "415", "422", "429"} <= set(create)
    assert "401" not in create


async def test_security_documented_when_keys_set(make_service: ServiceFactory) -> None:
    """With API keys the document lists the schemes and a 401 on every /api operation, not on health."""
    svc = await make_service(security={"api_keys": ["k"]})
    doc = await _doc(svc, {"X-API-Key": "k"})
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, item in doc["paths"].items():
        for op in item.values():
            assert ("401" in op["responses"]) == path.startswith("/api/"), path
