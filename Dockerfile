# The one image for web, worker and release (migrate): `docker build -t outlast .`, then run it with the
# Procfile's commands (docs/deploy/). Slim Debian, non-root, the runtime set pinned by requirements.lock.
# PYTHON_IMAGE may name any Debian-based image with python3.11+ and its venv module.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/outlast/bin:$PATH

# A venv of its own, so nothing the base image's Python carries is on the app's path.
RUN python3 -m venv /opt/outlast

# The lock alone first: this layer is rebuilt when dependencies change, not on every code change.
COPY requirements.lock /app/requirements.lock
RUN pip install --no-deps --require-virtualenv -r /app/requirements.lock

WORKDIR /app
COPY . /app
# Editable, so `outlast` (keys, tenants, migrate) runs this tree's code and finds migrations/ beside it;
# --no-deps: everything it needs came from the lock above. Bytecode now, since the user below can't write here.
RUN pip install --no-deps --require-virtualenv -e . \
    && pip check \
    && python -m compileall -q server worker \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin outlast

# A number, not a name, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001
EXPOSE 8000
# The web; the worker and the release phase are the Procfile's other commands.
CMD ["python", "-m", "server"]
