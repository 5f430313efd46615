# Convenience targets; each one works from a bare python3 through chatproject/bootstrap.py.
PY := .venv/bin/python

.PHONY: run test test-services lint format cert bench check-deploy clean

run:            ## set up (venv, migrate, demo data) and serve on http://127.0.0.1:8000
	python3 -m chatproject.bootstrap run

test:           ## the whole test suite on the embedded default (SQLite, in-memory layer)
	python3 -m chatproject.bootstrap test

test-services:  ## the suite again on the local PostgreSQL and Redis (what CI does second)
	DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \
	  python3 -m chatproject.bootstrap test

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

cert:           ## a self-signed development certificate in var/tls/ (for wss:// and the proxy configs)
	DJANGO_DEBUG=1 $(PY) manage.py make_dev_cert

bench:          ## the benchmark (see docs/performance.md)
	$(PY) -m bench

check-deploy:   ## apache2ctl -t and nginx -t on the shipped configs
	.ci/check-deploy

clean:
	rm -rf .venv var staticfiles .pytest_cache .ruff_cache
