"""The little both services share that is not the wire contract: how settings are read from the
environment (:mod:`pipeline_common.settings`) and how log lines look (:mod:`pipeline_common.logs`).

It imports neither `job_service` nor `analysis_worker` (import-linter checks), so the worker can
use it without depending on the job-service.
"""
