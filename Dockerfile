# tellerloop gateway image (CPU torch; the embedded SmolLM2 and MiniLM wheels baked in).
# Build: docker build -t tellerloop .
# Run:   docker run -p 8000:8000 -v $PWD/prod.toml:/etc/tellerloop/tellerloop.toml:ro -v tl-data:/data tellerloop
# The dev keys are refused on a non-loopback bind, so the mounted config must list your own keys
# (by sha256). deploy/compose.yaml runs two replicas with PostgreSQL, Chroma and vLLM (docs/scaling.md).

# ---- build: the virtualenv, exactly as `make install` makes it ----------------------------------
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends make gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY gateway gateway
COPY retraining retraining
COPY config config
COPY data data
RUN make install EXTRAS= TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- runtime: the virtualenv and the code, no compiler, not root -------------------------------
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 tellerloop \
    && mkdir -p /data /etc/tellerloop && chown tellerloop:tellerloop /data
WORKDIR /app
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TELLERLOOP_STORAGE__DATA_DIR=/data
USER 10001
VOLUME ["/data"]
EXPOSE 8000
# /ready: the model (or the upstream engine), the database and the knowledge base answer
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8000/ready', timeout=4).status == 200 else 1)"]
CMD ["tellerloop", "serve", "--config", "/etc/tellerloop/tellerloop.toml", "--host", "0.0.0.0", "--port", "8000"]
