# Redis from Debian's packages, standing in for the redis image docker-compose.yml names.
ARG DEBIAN_IMAGE=recmerge-debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -q && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server && \
    rm -rf /var/lib/apt/lists/* && \
    mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server", "--appendonly", "yes"]
