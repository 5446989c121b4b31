#!/bin/sh
# The one-shot `join` service of deploy/docker-compose.yml.  It runs with the proxy's
# configuration (administration through PostgreSQL, docs/scaling.md §2) and the app service's
# data volume at /var/lib/bastion: unless the app service has joined already, it mints a
# single-use join token and writes the token and the app service's app.yaml into that volume.
set -eu
dir=/var/lib/bastion
if [ -s "$dir/host/host.crt" ]; then
  echo "join: the app service has joined already (its host certificate is in its data volume)"
  exit 0
fi
bastion tokens add --type=app --ttl=30m --format=json >"$dir/join.json"
python - "$dir" <<'PY'
import json
import os
import pathlib
import sys

d = pathlib.Path(sys.argv[1])
res = json.loads((d / "join.json").read_text())
(d / "join.json").unlink()
fd = os.open(d / "join-token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    f.write(res["token"] + "\n")
template = pathlib.Path("/etc/bastion/app.yaml.in").read_text()
(d / "app.yaml").write_text(template.replace("@CA_PIN@", res["ca_pin"]))
print(f"join: token {res['id']} and app.yaml (ca_pin {res['ca_pin']}) written for the app service")
PY
