#!/usr/bin/env bash
# Structural checks of the deployment files, without Docker or a cluster:
#  - docker-compose.yml against the Compose Specification schema (check-jsonschema's vendored
#    compose-spec), and every local path it mounts or builds from exists;
#  - every path the Dockerfile copies exists;
#  - deploy/k8s/*.yaml against the Kubernetes API schemas (kubernetes-validate, strict: unknown
#    fields are errors);
#  - the Fuke configuration they ship (deploy/compose/fuke.yaml, and the fuke.yaml and policies in
#    deploy/k8s/configmap.yaml) with `fuke check`.
# Tools are pinned and installed into deploy/.venv (git-ignored) from PyPI.
#   scripts/validate-deploy.sh [path to the fuke binary, default: cargo run]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=deploy/.venv
if ! "$venv/bin/python" -c 'import check_jsonschema, kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'check-jsonschema==0.39.0' 'kubernetes-validate==1.37.0' 'PyYAML==6.0.3'
fi
fuke=("${1:-}")
[ -n "${fuke[0]}" ] || fuke=(cargo run --locked --quiet --)

echo "deploy: docker-compose.yml against the compose specification"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "deploy: local paths of docker-compose.yml and Dockerfile"
"$venv/bin/python" - <<'PY'
import os, re, sys, yaml
missing = []
compose = yaml.safe_load(open("docker-compose.yml"))
for name, svc in compose["services"].items():
    build = svc.get("build")
    if isinstance(build, dict):
        ctx = build.get("context", ".")
        for p in (ctx, os.path.join(ctx, build.get("dockerfile", "Dockerfile"))):
            if not os.path.exists(p):
                missing.append(f"services.{name}.build: {p}")
    for v in svc.get("volumes", []):
        src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if src.startswith(("./", "../", "/")) and not os.path.exists(src):
            missing.append(f"services.{name}.volumes: {src}")
for line in open("Dockerfile"):
    m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
    if m:
        for src in m.group(1).split()[:-1]:
            if not src.startswith("--") and not os.path.exists(src):
                missing.append(f"Dockerfile COPY: {src}")
for m in missing:
    print("missing:", m, file=sys.stderr)
sys.exit(1 if missing else 0)
PY

echo "deploy: deploy/k8s against the Kubernetes schemas"
"$venv/bin/kubernetes-validate" --strict deploy/k8s/*.yaml

echo "deploy: the shipped Fuke configuration"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The compose config, as it sits in the image: next to policies/ and models/.
cp deploy/compose/fuke.yaml ./.fuke-compose-check.yaml
trap 'rm -rf "$tmp" ./.fuke-compose-check.yaml' EXIT
"${fuke[@]}" check -c ./.fuke-compose-check.yaml
# The Kubernetes ConfigMaps, with the image's paths pointed at this checkout.
"$venv/bin/python" - "$tmp" "$PWD" <<'PY'
import os, sys, yaml
tmp, root = sys.argv[1], sys.argv[2]
docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(open("deploy/k8s/configmap.yaml"))}
cfg = docs["fuke-config"]["data"]["fuke.yaml"]
cfg = cfg.replace("/srv/fuke/models", os.path.join(root, "models"))
cfg = cfg.replace("/srv/fuke/policies", os.path.join(tmp, "policies"))
cfg = cfg.replace("/srv/fuke/tls/tls.crt", os.path.join(root, "certs/server.pem"))
cfg = cfg.replace("/srv/fuke/tls/tls.key", os.path.join(root, "certs/server.key"))
open(os.path.join(tmp, "fuke.yaml"), "w").write(cfg)
os.makedirs(os.path.join(tmp, "policies"))
for name, text in docs["fuke-policies"]["data"].items():
    open(os.path.join(tmp, "policies", name), "w").write(text)
PY
[ -f certs/server.pem ] || "${fuke[@]}" certs dev --dir certs
OPENAI_API_KEY=placeholder "${fuke[@]}" check -c "$tmp/fuke.yaml"
echo "deploy: ok"
