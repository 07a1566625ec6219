#!/usr/bin/env bash
# Makes sure the services the tests use answer, starting them if they don't: PostgreSQL (the catalog),
# Redis (the default Celery broker and the shared rate limits) and RabbitMQ (the other broker the tests cover).
set -uo pipefail
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! pg_up; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
if ! redis_up; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 30); do redis_up && break; sleep 1; done
fi
if ! rabbit_up; then
  rabbitmq-server -detached || true
  for _ in $(seq 60); do rabbit_up && break; sleep 1; done
fi
pg_up || { echo "PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
redis_up || { echo "Redis is not answering on 127.0.0.1:6379" >&2; exit 1; }
rabbit_up || { echo "RabbitMQ is not answering on 127.0.0.1:5672" >&2; exit 1; }
echo "services: postgres, redis and rabbitmq answer"
