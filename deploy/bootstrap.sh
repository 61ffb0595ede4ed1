#!/usr/bin/env bash
# Prepares a fresh machine for usage-metering: Java and Maven for the Apache Kafka broker
# (from Debian's packages, when running as root and they are missing; also docker-compose and
# Chromium for tests), a virtualenv in .venv,
# and the project with its test extras. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
# Checks docker-compose.yml in the tests (no Docker engine needed for `docker-compose config`).
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# The dashboard's browser test drives Debian's headless Chromium through its ChromeDriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: ${missing[*]} missing and not installable here (without Java and Maven the local stack uses the tansu broker)" >&2
  fi
fi

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python=$candidate
    break
  fi
done
[ -n "$python" ] || { echo "bootstrap: Python >= 3.11 is required" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The product with its test extras, and the development distribution (the local stack, bench, demo: deploy/dev).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ./schemas -e '.[test]' -e ./deploy/dev
echo "bootstrap: ready ($(.venv/bin/python --version), $(command -v java >/dev/null && echo 'Apache Kafka' || echo 'tansu') broker)"
