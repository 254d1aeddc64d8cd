"""Who may call what: the one table of method -> roles, beside the contract (jobs.proto).

Three audiences (README "Security"):

- **uploader**: backend services that upload videos (UploadService);
- **worker**: the analysis fleet (WorkerService);
- **operator**: people and jobctl: AdminService, plus what the other two can *read*
  (GetJob, WatchJob, ListUploadedParts). Operators do not upload and do not hold leases.

tests/unit/auth/test_policy.py walks the proto descriptors and fails when an RPC exists that this
table does not name (or the table names one that does not exist). A method missing here is
refused for everybody (fail closed), never let through.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class Role(enum.StrEnum):
    UPLOADER = "uploader"
    WORKER = "worker"
    OPERATOR = "operator"


U, W, OP = Role.UPLOADER, Role.WORKER, Role.OPERATOR

#: "/<package>.<Service>/<Method>" -> the roles that may call it.
POLICY: Mapping[str, frozenset[Role]] = {
    # UploadService: uploaders; operators may read.
    "/jobs.v1.UploadService/InitiateUpload": frozenset({U}),
    "/jobs.v1.UploadService/CompleteUpload": frozenset({U}),
    "/jobs.v1.UploadService/GetJob": frozenset({U, OP}),
    "/jobs.v1.UploadService/WatchJob": frozenset({U, OP}),
    "/jobs.v1.UploadService/SignUploadParts": frozenset({U}),
    "/jobs.v1.UploadService/ListUploadedParts": frozenset({U, OP}),
    # Events: an uploader sees its own jobs' events and jobs, an operator all.
    "/jobs.v1.UploadService/StreamEvents": frozenset({U, OP}),
    "/jobs.v1.UploadService/ListEvents": frozenset({U, OP}),
    "/jobs.v1.UploadService/ListJobs": frozenset({U, OP}),
    # WorkerService: the fleet only (every call claims or changes a lease).
    "/jobs.v1.WorkerService/ClaimJob": frozenset({W}),
    "/jobs.v1.WorkerService/Heartbeat": frozenset({W}),
    "/jobs.v1.WorkerService/ReportProgress": frozenset({W}),
    "/jobs.v1.WorkerService/CompleteJob": frozenset({W}),
    "/jobs.v1.WorkerService/FailJob": frozenset({W}),
    "/jobs.v1.WorkerService/ReleaseJob": frozenset({W}),
    "/jobs.v1.WorkerService/BatchReportProgress": frozenset({W}),
    "/jobs.v1.WorkerService/BatchCompleteJobs": frozenset({W}),
    # AdminService: operators.
    "/jobs.v1.AdminService/ListJobs": frozenset({OP}),
    "/jobs.v1.AdminService/GetStats": frozenset({OP}),
    "/jobs.v1.AdminService/RequeueJob": frozenset({OP}),
    "/jobs.v1.AdminService/CancelJob": frozenset({OP}),
    "/jobs.v1.AdminService/PurgeJobs": frozenset({OP}),
    "/jobs.v1.AdminService/AddWebhookEndpoint": frozenset({OP}),
    "/jobs.v1.AdminService/ListWebhookEndpoints": frozenset({OP}),
    "/jobs.v1.AdminService/SetWebhookEndpointEnabled": frozenset({OP}),
    "/jobs.v1.AdminService/RotateWebhookSecret": frozenset({OP}),
    "/jobs.v1.AdminService/RemoveWebhookEndpoint": frozenset({OP}),
    "/jobs.v1.AdminService/ReplayWebhookEvents": frozenset({OP}),
    "/jobs.v1.AdminService/ListTenants": frozenset({OP}),
    "/jobs.v1.AdminService/SetTenant": frozenset({OP}),
}

#: Services anyone may call: load balancers and orchestrators probe health without credentials.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
#: Server reflection (grpcurl's schema look-ups); open or authenticated per JOB_SERVICE_REFLECTION.
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

#: Roles that see every job, whoever uploaded it.
SEES_ALL_JOBS = frozenset({OP})


def service_of(method: str) -> str:
    """ "/jobs.v1.UploadService/GetJob" -> "jobs.v1.UploadService"."""
    return method.lstrip("/").partition("/")[0]


def allowed_roles(method: str) -> frozenset[Role]:
    """The roles that may call `method`; empty (nobody) for a method the table does not name."""
    return POLICY.get(method, frozenset())
