"""Throwaway local infrastructure shared by the test suite and the ``make run`` dev stack.

Everything here binds to 127.0.0.1 only, picks free ports, and cleans up every process it starts,
also when start-up fails half-way:

* :mod:`localinfra.postgres` -- :class:`~localinfra.postgres.PostgresCluster`, a PostgreSQL
  cluster run from the system binaries.
* :mod:`localinfra.s3` -- :class:`~localinfra.s3.MotoS3` (in-process moto server, no signature
  checks) and :class:`~localinfra.s3.SeaweedS3` (a real, SigV4-checking SeaweedFS S3 gateway).
* :mod:`localinfra.supervise` -- child processes: spawn, wait until healthy, stop with a grace
  period (shared by ``make run`` and tests/support/procs.py).
* :mod:`localinfra.netports` and :mod:`localinfra.process` -- free TCP ports, bounded polling,
  and :class:`~localinfra.process.Lifeline`, a watcher that kills what we started if this Python
  process is killed before it could clean up (a test runner SIGKILLed on timeout).

Submodules are not imported here so that, e.g., the Postgres helper does not pay for importing moto.
"""
