"""Admin routes: register and remove adapters live, behind the admin key.

With no `DYNAMERGE_ADMIN_KEY` configured the routes still exist but answer 403
(`permission_error`, code `admin_disabled`) to everyone, so a client can tell "disabled here"
from "no such endpoint"; with one configured, a missing or wrong key is a 401.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from adapters.errors import AdapterNotFoundError
from app.api.deps import adapter_ids, ready_engine, require_admin_key
from app.api.errors import AdapterConflictError, InvalidParameterError
from app.api.openapi import responses
from app.engine.blend import AUTO_MODEL, BASE_MODEL
from app.protocol import (
    AdapterRequest,
    AdapterResponse,
    AdapterTier,
    AdapterTierList,
    RefusedAdapterInfo,
)

router = APIRouter(prefix="/v1/adapters", tags=["admin"],
                   dependencies=[Depends(require_admin_key)])


@router.get("", responses=responses(401, 403, 503))
async def list_adapters(request: Request) -> AdapterTierList:
    """Every adapter of the store with the tier it is in now (device, host or disk), and the
    adapters the store refused at validation, with why."""
    engine = ready_engine(request)
    infos = await run_in_threadpool(engine.adapters)
    return AdapterTierList(
        data=[AdapterTier(**vars(info)) for info in infos],
        refused=[RefusedAdapterInfo(id=r.id, reason=r.reason)
                 for r in engine.refused_adapters()],
    )


@router.post("", status_code=201,
             responses=responses(400, 401, 403, 404, 409, 413, 422, 503))
async def register_adapter(body: AdapterRequest, request: Request) -> AdapterResponse:
    """Load `<adapter_store>/<id>` and index its exemplars; requests in flight are unaffected."""
    engine = ready_engine(request)
    if body.id in (AUTO_MODEL, BASE_MODEL):
        raise InvalidParameterError(f"{body.id!r} is a reserved model name", param="id")
    if body.id in engine.models():
        raise AdapterConflictError(f"adapter {body.id!r} is already registered", param="id")
    await run_in_threadpool(engine.register_adapter, body.id)
    return AdapterResponse(id=body.id, status="registered", adapters=adapter_ids(engine))


@router.delete("/{adapter_id}", responses=responses(401, 403, 404, 503))
async def unregister_adapter(adapter_id: str, request: Request) -> AdapterResponse:
    """Stop routing to the adapter now; its slot is freed once no running request uses it."""
    engine = ready_engine(request)
    if adapter_id not in adapter_ids(engine):
        raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
    await run_in_threadpool(engine.unregister_adapter, adapter_id)
    return AdapterResponse(id=adapter_id, status="deleted", adapters=adapter_ids(engine))
