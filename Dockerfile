# The image the Kubernetes manifests run for every Flotilla role:
#   flotilla serve {router|batcher|preprocess} --config FILE --port N
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flotilla flotilla
COPY services services
COPY clients clients
RUN pip install --no-cache-dir .
USER 65532:65532
ENTRYPOINT ["flotilla"]
