#!/usr/bin/env bash
# Makes sure PostgreSQL answers on 127.0.0.1:5432 with trust auth (the tests create and drop a
# fresh database per run). Uses the running server when there is one; otherwise starts the
# installed cluster, or installs Debian's postgresql first.
set -euo pipefail
if command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; then
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
hba=/etc/postgresql/$version/main/pg_hba.conf
grep -q "^host all all 127.0.0.1/32 trust" "$hba" || \
  sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
pg_ctlcluster --skip-systemctl-redirect "$version" main start || \
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 -q && exit 0
  sleep 1
done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
