# PostgreSQL from Debian's packages, configured like the postgres image docker-compose.yml names:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB create the role and database on the first start.
ARG DEBIAN_IMAGE=recmerge-debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -q && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15 && \
    rm -rf /var/lib/apt/lists/* && \
    pg_dropcluster 15 main && \
    mkdir -p /var/lib/postgresql/data && chown postgres:postgres /var/lib/postgresql/data && \
    chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
USER postgres
ENTRYPOINT ["postgres-entrypoint"]
CMD ["-c", "listen_addresses=*"]
