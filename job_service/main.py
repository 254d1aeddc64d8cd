"""`python -m job_service`: the job-service from environment configuration (see config.py)."""

from __future__ import annotations

import asyncio
import logging
import signal

from job_service.app import JobServiceApp
from job_service.config import Settings
from job_service.logs import configure_logging

log = logging.getLogger("job_service")


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with JobServiceApp(settings) as app:
        # SIGHUP: re-read the TLS certificate and the verification keys (README, Security).
        loop.add_signal_handler(signal.SIGHUP, app.reload_credentials)
        await stop.wait()
        log.info("shutting down")


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
