# http_bucket: everyday commands.  Only `run` and `check-isolated` need
# nothing but CPython; `test` needs requirements-test.txt installed.

PYTHON ?= python3
ARGS ?=

.PHONY: run test test-e2e test-e2e-deps bench bench-quick bench-peers lint docker docker-test \
	package-test check-isolated ci

run:
	$(PYTHON) http_bucket.py $(ARGS)

# The README's test command.
test:
	$(PYTHON) -m pytest -q

# The browser tests (headless Chromium) and interop tests (Node clients),
# which `make test` skips; test-e2e-deps installs what they need first
# (Debian's chromium as root, playwright into $(PYTHON), npm ci in interop/).
test-e2e:
	HTTP_BUCKET_BROWSER=1 HTTP_BUCKET_INTEROP=1 $(PYTHON) -m pytest -q -rs test_browser.py test_interop.py

test-e2e-deps:
	bash .ci/install-e2e $(PYTHON)

bench:
	$(PYTHON) bench_http_bucket.py

bench-quick:
	$(PYTHON) bench_http_bucket.py --quick

# http_bucket against copyparty alone; copyparty is pip-installed on first use
# into a bench-only venv (~/.cache/http_bucket-bench), or skipped, and said so.
bench-peers:
	$(PYTHON) bench_http_bucket.py --only peers

# Optional tool: ruff if installed, else pyflakes, else a note (exit 0).
lint:
	@if command -v ruff >/dev/null 2>&1; then \
		echo "ruff check ."; ruff check .; \
	elif $(PYTHON) -m ruff --version >/dev/null 2>&1; then \
		echo "$(PYTHON) -m ruff check ."; $(PYTHON) -m ruff check .; \
	elif $(PYTHON) -m pyflakes --version >/dev/null 2>&1; then \
		echo "$(PYTHON) -m pyflakes *.py"; $(PYTHON) -m pyflakes *.py; \
	else \
		echo "lint: neither ruff nor pyflakes is installed (optional: $(PYTHON) -m pip install ruff); skipped"; \
	fi

docker:
	docker build -t http-bucket .

# Builds the Dockerfile with podman (base: a cached debootstrap bookworm root
# standing in for python:3.12-slim) and checks the image as built; see
# .ci/docker-test.  Needs root; a skip (exit 77, reason printed) is not an error.
docker-test:
	@bash .ci/docker-test; rc=$$?; [ $$rc -eq 77 ] && exit 0; exit $$rc

# The wheel (pip wheel), installed into a fresh venv; its `http-bucket`
# command runs the server, push and pull (see .ci/package-test).
package-test:
	@bash .ci/package-test; rc=$$?; [ $$rc -eq 77 ] && exit 0; exit $$rc

# Proof of zero dependencies: starts with no site-packages and no user paths.
check-isolated:
	$(PYTHON) -I -S http_bucket.py --help >/dev/null
	@echo "check-isolated: $(PYTHON) -I -S http_bucket.py --help: ok"

# What CI runs: the test command on every CPython 3.9-3.13 found.
ci:
	bash .ci/run
