# One image for every role of compute-api:
#   API:       compute-api serve --host 0.0.0.0 --port 8000   (the default command)
#   scheduler: dask scheduler ...
#   workers:   dask worker ...
# The scheduler unpickles task graphs and workers import service.tasks, so all three must run the same
# code and the same dask version: build once, run everywhere.
#
# PYTHON_IMAGE defaults to the official slim image. Where no registry is reachable, scripts/build-image.sh
# passes a debootstrap-built base (localhost/python-base:bookworm, Debian's python3, no `python` symlink),
# so everything below calls python3 and never relies on pip outside the venv.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
# Dependencies first, from the hashed lock only, so code edits do not invalidate this layer.
# --only-binary keeps compilers out of the build as well as the runtime stage.
ARG REQUIREMENTS=requirements.lock
COPY ${REQUIREMENTS} /tmp/requirements.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps --only-binary=:all: -r /tmp/requirements.lock
COPY pyproject.toml README.md /src/
COPY service /src/service
# --no-deps: every dependency already came from the lock; nothing unpinned sneaks in here.
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib
# compute-api's Dask settings, where every dask process of the venv reads them ({sys.prefix}/etc/dask):
# the chart's scheduler and worker pods run plain `dask scheduler|worker`, which never import the
# service. DASK_* variables still win. (dask-api.yaml, the API-only part, is applied by the API.)
COPY service/dask.yaml /opt/venv/etc/dask/compute-api.yaml

FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
ARG APP_GID=10001
# Numeric IDs so Kubernetes' runAsNonRoot can verify them without a passwd lookup.
RUN groupadd --system --gid "${APP_GID}" app \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# The in-cluster Locust pods run the project's scenarios from this same image.
COPY locustfiles /app/locustfiles
WORKDIR /app
# The root filesystem is read-only in production: everything that writes (dask's spill/lock files,
# worker-space, ~/.config/dask, caches) goes to the /tmp tmpfs/emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    DASK_TEMPORARY_DIRECTORY=/tmp \
    HOST=0.0.0.0 \
    PORT=8000
USER ${APP_UID}:${APP_GID}
EXPOSE 8000 8786 8787
# No wrapper ENTRYPOINT: the scheduler and worker roles pass `dask scheduler|worker ...` as the
# command, and each Python process is PID 1 with its own SIGTERM handler (uvicorn, dask).
CMD ["compute-api", "serve", "--host", "0.0.0.0", "--port", "8000"]
