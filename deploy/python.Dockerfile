# What the project's Dockerfile expects of its base (python:3.11-slim): Python 3.11 with `python` and
# `pip` on PATH, and pip free to install — Debian's own interpreter refuses (PEP 668), hence the venv.
ARG DEBIAN_IMAGE=recmerge-debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update -q && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    python3 -m venv /opt/python
ENV PATH=/opt/python/bin:$PATH LANG=C.UTF-8
