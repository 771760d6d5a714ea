#!/usr/bin/env bash
# First start of each PostgreSQL container of docker-compose.test.yml: the users and database the test
# harness makes (tests/harness.py default_users), and replication connections for the replica.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres <<'SQL'
CREATE ROLE app LOGIN PASSWORD 'app';
SET password_encryption = 'md5';
CREATE ROLE md5user LOGIN PASSWORD 'md5pw';
RESET password_encryption;
CREATE ROLE plainuser LOGIN PASSWORD 'plainpw';
CREATE DATABASE app OWNER app;
SQL
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
