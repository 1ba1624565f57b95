# One image for the api, the worker and the migration step; docker-compose.yml picks the command.
# torch comes from PyPI, whose Linux wheel carries CUDA: the same image trains on a GPU when the
# container is given one (docker-compose.gpu.yml) and on the CPU otherwise. deploy/check.sh builds it
# with the CPU wheel instead, from a wheelhouse (PIP_FIND_LINKS below).
# BASE_IMAGE: any image with Python 3.11 whose `python` and `pip` are on PATH (deploy/check.sh builds
# one from Debian's packages where no registry is reachable).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 1000 recmerge && mkdir -p /data && chown recmerge /data

# pip's sources for this build only (a wheelhouse, a mirror): unset unless given, and not kept in the
# image's environment — though `docker history` shows them, so never pass credentials this way.
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

# torch alone first, the largest layer: no file of the project's can invalidate it. Then the other
# dependencies, from pyproject.toml alone, so that a code or README change reinstalls neither.
RUN pip install "torch==2.13.0"
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/req.txt', 'w').write('\n'.join(d))" && \
    pip install -r /tmp/req.txt

# pyproject names README.md as the long description; a checkout without one still installs.
COPY README.m[d] alembic.ini ./
RUN test -f README.md || echo "# recmerge" > README.md
COPY core ./core
COPY models ./models
COPY merging ./merging
COPY workers ./workers
COPY app ./app
COPY migrations ./migrations
RUN pip install --no-deps .

USER recmerge
ENV RECMERGE_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
