"""Developer entry points run by the Makefile (`make run`, `make demo`)."""
