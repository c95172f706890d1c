#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine, as root: install runc, busybox-static and
# moord, start the daemon, build a busybox OCI image with moord's own code, import it,
# and run a container that prints hello.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq runc busybox-static python3 python3-venv >/dev/null

python3 -m venv /opt/moord
/opt/moord/bin/pip install -q .
ln -sf /opt/moord/bin/moord /opt/moord/bin/moorctl /opt/moord/bin/moord-shim /usr/local/bin/

mkdir -p /etc/moord
[ -f /etc/moord/config.toml ] || moord config default > /etc/moord/config.toml

if ! moorctl --timeout 2 tree >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    install -m 0644 contrib/moord.service /etc/systemd/system/moord.service
    systemctl daemon-reload
    systemctl start moord
  else
    # No systemd here: run the supervisor in the background, logging to a file.
    nohup moord >/var/log/moord.log 2>&1 &
  fi
  for _ in $(seq 100); do moorctl --timeout 1 tree >/dev/null 2>&1 && break; sleep 0.1; done
fi
moorctl tree

image_dir=$(mktemp -d)
moorctl images build-busybox "$image_dir/busybox"
moorctl images import "$image_dir/busybox"
rm -rf "$image_dir"
moorctl images ls
moorctl run --rm docker.io/library/busybox:latest hello echo hello
