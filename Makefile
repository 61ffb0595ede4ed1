# The two commands for a fresh machine: `make demo` and `make test`.
.PHONY: demo test faults-long bootstrap stack-down

bootstrap:
	./deploy/bootstrap.sh

demo: bootstrap
	.venv/bin/metering demo

# The manual first (a broken link, anchor or nav entry fails it; the site goes to the ignored .site/), then the
# static checks (settings in pyproject.toml): ruff over the three distributions and tests/, mypy over the
# distributions; then pytest.
test: bootstrap
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir .site
	.venv/bin/ruff check pipeline schemas deploy tests
	.venv/bin/ruff format --check pipeline schemas deploy tests
	.venv/bin/mypy
	.venv/bin/python -m pytest --durations=15

# The fault tests at full length (a 60 s ClickHouse outage, a 2-minute rebalance storm, 2 minutes of load on the
# three-broker cluster); about 9 minutes.
faults-long: bootstrap
	METERING_FAULT_OUTAGE_SECONDS=60 METERING_FAULT_STORM_SECONDS=120 METERING_FAULT_CLUSTER_SECONDS=120 \
		.venv/bin/python -m pytest -s tests/integration/test_faults.py tests/integration/test_broker_cluster.py

stack-down:
	.venv/bin/metering stack down
