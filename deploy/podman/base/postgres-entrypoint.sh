#!/bin/sh
# The postgres:17 image's entrypoint contract, for the local stand-in image: on the first
# start (empty PGDATA) create the cluster with superuser POSTGRES_USER (default postgres,
# password POSTGRES_PASSWORD, required) and database POSTGRES_DB (default: the user's name),
# accept password (scram-sha-256) connections from any address, then run the server as
# user postgres. The first-start server listens on a private socket directory only, so a
# `pg_isready` healthcheck does not pass before the database exists.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "$1" != postgres ]; then exec "$@"; fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the superuser's password)}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    initsock="$(mktemp -d)"
    pg_ctl --pgdata="$PGDATA" --wait \
        -o "-c listen_addresses='' -c unix_socket_directories='$initsock'" start
    if [ "$db" != postgres ]; then
        echo 'CREATE DATABASE :"db";' | psql --host="$initsock" --username="$user" \
            --dbname=postgres --no-psqlrc -v ON_ERROR_STOP=1 --set=db="$db"
    fi
    pg_ctl --pgdata="$PGDATA" --wait --mode=fast stop
    rmdir "$initsock"
fi
exec "$@"
