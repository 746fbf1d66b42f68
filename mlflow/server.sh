#!/usr/bin/env bash
# Start the MLflow tracking server for a sweep: mlflow/server.sh [STORE_DIR] [PORT] [HOST]
#
# SQLite backend and artifact store in STORE_DIR (default ./mlflow-store); artifacts are proxied
# through the server (--serve-artifacts), so trials on other nodes need only the HTTP URI.
# MLFLOW_BACKEND_STORE_URI picks another backend, e.g. postgresql://user@host:5432/mlflow (needs
# psycopg2): many concurrent trials are PostgreSQL's strength, not a SQLite file's.
# Binds 127.0.0.1 unless a HOST is given: pass the login node's address only when compute nodes
# must reach it, and put authentication in front of it (MLflow credentials come from the
# clients' environment: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN).
set -euo pipefail
store=$(realpath -m "${1:-mlflow-store}")
port=${2:-5000}
host=${3:-127.0.0.1}
if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
  echo "warning: binding $host: the tracking server is reachable beyond this machine" >&2
fi
# The job runner (huey consumers, several processes) serves GenAI evaluation jobs; sweeps do
# not use it, and it would take the CPU from training on a small login node.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
# SQLAlchemy's default pool (5 connections + 10 overflow) answers the 16th concurrent writer with
# "QueuePool limit … reached" (HTTP 400, after 30 s): bench/results/tracking_load.md. Room for
# 64 trials at once; PostgreSQL's default max_connections is 100.
export MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=${MLFLOW_SQLALCHEMYSTORE_POOL_SIZE:-16}
export MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=${MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW:-48}
mkdir -p "$store/artifacts"
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$store/mlflow.db}
exec mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$store/artifacts" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  --workers 1
