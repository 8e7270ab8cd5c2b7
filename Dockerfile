# One image for every gridqueue process: workers, watchdogs and the CLI.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
# Editable, so that config/workloads.toml (the default GRIDQUEUE_WORKLOADS_FILE) is found
# next to the package.
RUN pip install -e . \
    && useradd --create-home --uid 10001 gridqueue

# Celery warns when a worker runs as root; nothing here needs it.
USER gridqueue

CMD ["gridqueue", "--help"]
