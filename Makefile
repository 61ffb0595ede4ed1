# The two commands for a fresh machine: `make demo` and `make test`.
.PHONY: demo test bootstrap stack-down

bootstrap:
	./deploy/bootstrap.sh

demo: bootstrap
	.venv/bin/metering demo

test: bootstrap
	.venv/bin/python -m pytest

stack-down:
	.venv/bin/metering stack down
