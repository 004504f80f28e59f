from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from haif.bridge.routers.common import ERROR_RESPONSES, service
from haif.protocol import JobList, JobRecord, UsageList

router = APIRouter(tags=["jobs"])

MAX_LIST = 1000


@router.get(
    "/v1/jobs",
    response_model=JobList,
    responses=ERROR_RESPONSES,
    summary="The caller's tenant's jobs",
)
async def list_jobs(
    request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100
) -> Response:
    return await service(request).jobs(limit, request)


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobRecord,
    responses=ERROR_RESPONSES,
    summary="One job of the caller's tenant (404 for any other)",
)
async def get_job(
    job_id: Annotated[str, Path(min_length=1, max_length=64)], request: Request
) -> Response:
    return await service(request).job(job_id, request)


@router.get(
    "/v1/usage",
    response_model=UsageList,
    responses=ERROR_RESPONSES,
    summary="Usage records of the caller's tenant (needs the admin scope)",
)
async def list_usage(
    request: Request,
    since: Annotated[
        datetime | None, Query(description="ISO 8601; records finished at or after")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
) -> Response:
    return await service(request).usage(since, limit, request)
