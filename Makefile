# Every target is a command, not a file.
.PHONY: up down logs status deps test bench fmt lint load

up:
	scripts/stack.sh up

down:
	scripts/stack.sh down

logs:
	scripts/stack.sh logs

status:
	scripts/stack.sh status

deps:
	scripts/install-deps.sh

test:
	scripts/install-deps.sh
	scripts/test.sh

bench:
	scripts/bench.sh

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# k6 load against `make up`'s gateway (BASE_URL and ADMIN_API_KEY override).
load:
	scripts/install-deps.sh
	scripts/load.sh
