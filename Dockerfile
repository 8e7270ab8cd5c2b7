# One image for every gridqueue process: workers, watchdogs and the CLI.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed the way any server installs it, `pip install .` (no extras, not editable):
# the default workload classes and the demo handlers (workers.simulated) ship inside the
# installed packages, so the source tree is not kept.
WORKDIR /tmp/gridqueue-src
COPY . .
RUN pip install . \
    && cd / && rm -rf /tmp/gridqueue-src \
    && useradd --create-home --uid 10001 gridqueue

# Celery warns when a worker runs as root; nothing here needs it.
USER gridqueue
WORKDIR /home/gridqueue

CMD ["gridqueue", "--help"]
