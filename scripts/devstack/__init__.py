"""`make run`: the whole pipeline on this machine, in the foreground, until Ctrl-C.

Starts, in order: PostgreSQL (data in .run/pg, database `jobs`), SeaweedFS S3 (data in .run/s3,
bucket `videos`, credentials devaccess/devsecret), `alembic upgrade head`, one job-service and two
analysis workers. Each service's output is streamed here, prefixed with its name (JSON log lines
shortened to `time level message key=value`), and written unchanged to .run/logs/<name>.log.

Ctrl-C or SIGTERM stops the workers first (they hand their leases back), then the job-service,
then S3 and Postgres. A second Ctrl-C skips the waiting. When any process dies on its own, the
rest is stopped and the exit status is 1.

Ports are the services' defaults, so `make demo`, grpcurl commands and bookmarks stay valid from
run to run. A busy port stops the start with a message naming the variable that moves it, rather
than a silently different port. SeaweedFS's S3 port is the exception: it is picked free at every
start (localinfra.s3 chooses all eight SeaweedFS ports) and printed in the banner.

Other JOB_SERVICE_* and ANALYSIS_WORKER_* variables in the environment reach the services, e.g.
`JOB_SERVICE_LOG_LEVEL=DEBUG make run`; the addresses, credentials and worker ids are set here.

The package, by job: `options` (command line, ports), `console` (prefixed, shortened output),
`signals` (Ctrl-C handling), `stack` (starting, watching and stopping the services; process
supervision itself is localinfra.supervise), `state` (the state file and the banner), `cleanup`
(after a run that was killed), `__main__` (`python -m scripts.devstack`).
"""


class StackError(Exception):
    """The stack cannot start or keep running; the message says what to do."""
