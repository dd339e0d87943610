# syntax=docker/dockerfile:1
# paydispatch image: one image for every role (serve, migrate, provider, python -m load).
#   build stage: a virtualenv with the project pip-installed from the copied sources;
#   final stage: the same slim Python, only that virtualenv, a non-root user, no build tools.
# Both stages must use the same base: the venv's interpreter links to /usr/local/bin/python3.11.
# Checked offline by .ci/validate-deploy (hadolint).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# checkov:skip=CKV_DOCKER_7:both FROMs use PYTHON_IMAGE, pinned above; checkov does not resolve ARGs

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/paydispatch
# Only what the package needs (pyproject names README.md as its readme).
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY load ./load
RUN /opt/paydispatch/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# A fixed numeric uid/gid, so `USER` needs no passwd lookup and volume ownership is predictable.
# /data belongs to it: a new named volume mounted there (the provider's ledger) copies this
# ownership, so the unprivileged user can write its SQLite files.
RUN groupadd --system --gid 10001 paydispatch \
    && useradd --system --uid 10001 --gid paydispatch --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin paydispatch \
    && install -d -o 10001 -g 10001 -m 0750 /data
COPY --from=build /opt/paydispatch /opt/paydispatch
ENV PATH=/opt/paydispatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# 8080: the replica API (serve); 8081: the stand-in provider.
EXPOSE 8080 8081
# No curl in this image: ask /readyz with the standard library (any error or non-2xx exits 1).
# Roles that are not a replica override or disable this in docker-compose.yml.
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PAYDISPATCH_PORT', '8080') + '/readyz', timeout=2)"]
ENTRYPOINT ["paydispatch"]
CMD ["serve", "--host", "0.0.0.0"]
