# tellerloop gateway image (CPU). Build: docker build -t tellerloop .
# Run:  docker run -p 8000:8000 -v $PWD/prod.toml:/etc/tellerloop.toml -v tl-data:/data tellerloop
# The dev keys are refused on a non-loopback bind, so the mounted config must list your own keys (by sha256).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN make install
ENV HF_HUB_OFFLINE=1 TELLERLOOP_STORAGE__DATA_DIR=/data
EXPOSE 8000
CMD [".venv/bin/tellerloop", "serve", "--config", "/etc/tellerloop.toml", "--host", "0.0.0.0", "--port", "8000"]
