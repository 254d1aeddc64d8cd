"""`python -m analysis_worker`: start a worker configured from ANALYSIS_WORKER_* variables."""

from analysis_worker.main import main

raise SystemExit(main())
