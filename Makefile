# The two commands of the README. Each installs what it needs first (scripts/bootstrap.sh:
# .venv with the Python packages, PostgreSQL server binaries via apt when absent).
.PHONY: demo test test-all bench

demo:
	bash scripts/bootstrap.sh
	.venv/bin/onesignal-bridge demo

test:
	bash scripts/bootstrap.sh
	.venv/bin/ruff check bridge tests bench scripts
	.venv/bin/mypy
	.venv/bin/python -m pytest -q -p no:cacheprovider

# Long campaigns too (hundreds of crash runs): see tests/README in docs.
test-all:
	bash scripts/bootstrap.sh
	.venv/bin/ruff check bridge tests bench scripts
	.venv/bin/mypy
	ONESIGNAL_BRIDGE_LONG=1 .venv/bin/python -m pytest -q -p no:cacheprovider
