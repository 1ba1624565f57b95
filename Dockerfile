# One image for the api, the worker and the migration step; docker-compose.yml picks the command.
# torch comes from PyPI, whose Linux wheel carries CUDA: the same image trains on a GPU when the
# container is given one (the worker's device reservation) and on the CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 1000 recmerge && mkdir -p /data && chown recmerge /data

# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.m[d] ./
RUN pip install "torch==2.13.0" && \
    python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/req.txt', 'w').write('\n'.join(d))" && \
    pip install -r /tmp/req.txt

# pyproject names README.md as the long description; a checkout without one still installs.
RUN test -f README.md || echo "# recmerge" > README.md
COPY alembic.ini ./
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
