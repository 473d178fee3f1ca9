# syntax=docker/dockerfile:1
# Operator image: kopf + the Kubernetes client, no ML stack (no torch).
# Build from the repository root:  docker build -t finetune-operator .
# Release builds pin the base by digest too: --build-arg PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
# Only the operator package: not the trainer, not finetune_local (the embedded API and demo).
COPY operator/finetune_operator/ operator/finetune_operator/
# A virtual environment keeps the image's own Python untouched; it is copied whole below.
# The project is installed without extras: exactly the base dependencies of pyproject.toml.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile . \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="finetune-operator" \
      org.opencontainers.image.description="Kubernetes operator for self-service LLM fine-tuning" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
# A fixed numeric non-root user, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8081 9090
ENTRYPOINT ["finetune-operator"]
CMD ["run"]
