#!/usr/bin/env bash
# The services the tests use for real: PostgreSQL on 127.0.0.1:5432 (the ledger suite creates and
# drops its own databases; trust auth, user postgres) and Redis on 127.0.0.1:6379 (the cache's
# second level, shared rate limits). The machine starts both; this starts one that has stopped,
# with the commands the machine uses, and waits until both answer.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 5432; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if ! up 6379; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
for _ in $(seq 50); do
  up 5432 && up 6379 && exit 0
  sleep 0.2
done
echo "services: PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) must be running for the tests" >&2
exit 1
