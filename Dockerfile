# syntax=docker/dockerfile:1
# Build stage: a wheel-installed virtualenv. Final stage: slim runtime, non-root, no compilers.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/paydispatch
COPY pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY load ./load
RUN /opt/paydispatch/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home paydispatch
COPY --from=build /opt/paydispatch /opt/paydispatch
ENV PATH=/opt/paydispatch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAYDISPATCH_HOST=0.0.0.0
USER paydispatch
EXPOSE 8080
HEALTHCHECK --interval=5s --timeout=2s CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/livez', timeout=2)"]
ENTRYPOINT ["paydispatch"]
CMD ["serve"]
