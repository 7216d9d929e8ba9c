# One image for all three services; docker-compose picks the service with `command`.
FROM python:3.11-slim

WORKDIR /app
# Dependencies first, at the versions requirements.lock pins: a code edit reuses this layer.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock

COPY pyproject.toml README.md ./
COPY tierwriter ./tierwriter
COPY generator_service ./generator_service
COPY orchestrator_service ./orchestrator_service
COPY persistence_service ./persistence_service
RUN pip install --no-cache-dir --no-deps . \
    && groupadd --system --gid 10001 tierwriter \
    && useradd --system --uid 10001 --gid 10001 --home /app tierwriter \
    && mkdir -p /app/data /app/output \
    && chown tierwriter /app/data /app/output

# Listen on every interface inside the container; compose decides what is published.
ENV ORCHESTRATOR_ADDRESS=0.0.0.0:50051 \
    GENERATOR_ADDRESS=0.0.0.0:50052 \
    PERSISTENCE_ADDRESS=0.0.0.0:50053 \
    PYTHONUNBUFFERED=1

# The manifests in deploy/kubernetes run the image as this user's uid 10001 directly.
# The entrypoint starts as root only to hand bind-mounted folders and TLS files to the
# `tierwriter` user, then runs the service as that user (tierwriter/container.py).
ENTRYPOINT ["python", "-m", "tierwriter.container"]
CMD ["orchestrator_service"]
