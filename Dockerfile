# syntax=docker/dockerfile:1
# The webhook server image: `docker build -t locust-observability-webhook:0.1.0 .`
# Both stages use the same pinned base, so the venv's python symlink resolves in the runtime.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package needs (see .dockerignore): dependencies come from pyproject.toml, at
# the versions pinned in constraints.txt.
COPY pyproject.toml README.md constraints.txt ./
COPY webhook ./webhook
# A regular (not editable) install: the runtime stage gets the venv, not the sources.
# pip also compiles the bytecode here, since the runtime's root filesystem is read-only.
RUN /opt/venv/bin/pip install --constraint constraints.txt /src

FROM python:3.11.13-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
COPY --from=build /opt/venv /opt/venv
# distroless' "nonroot" UID; the Deployment's runAsUser is the same number.
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["locust-webhook"]
CMD ["serve"]
