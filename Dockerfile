# sonic: the HTTP service on waitress, port 8080 (docs/scaling.md, "Containers").
#   docker build -t sonic .                              # CPU (torch's CPU wheel)
#   docker build -t sonic:cuda --build-arg TORCH=cuda .  # CUDA (torch's PyPI wheel brings its CUDA libraries;
#                                                        # run with --gpus all and the NVIDIA container toolkit)
#   docker run -p 8080:8080 sonic
# Not built in this repository's CI (no Docker daemon there): see docs/scaling.md.
FROM python:3.11-slim

ARG TORCH=cpu
# opencv (brought by mediapipe) needs libGL and glib at import
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
# torch first, from the index that matches the variant; then the pinned rest (torch is then satisfied)
RUN if [ "$TORCH" = "cpu" ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi \
 && pip install --no-cache-dir -r requirements.txt
COPY . .
# the face and phoneme models ship inside the mediapipe and pocketsphinx wheels: nothing is
# downloaded when the container starts
RUN pip install --no-cache-dir --no-deps . \
 && useradd --create-home --uid 10001 sonic \
 && mkdir -p /srv/sonic/outputs /srv/sonic/uploads /srv/sonic/data \
 && chown -R sonic:sonic /srv/sonic

USER sonic
ENV SONIC_HOST=0.0.0.0 \
    SONIC_PORT=8080 \
    SONIC_OUTPUT_DIR=/srv/sonic/outputs \
    SONIC_UPLOAD_DIR=/srv/sonic/uploads \
    SONIC_DATA_DIR=/srv/sonic/data \
    PYTHONUNBUFFERED=1
VOLUME ["/srv/sonic"]
EXPOSE 8080
# /health answers 200 when ready (503 when no worker is alive); waitress listens once the model
# has loaded (the start period covers it). SONIC_HOST/SONIC_PORT serve `sonic serve` in this
# image; waitress listens where CMD says. A settings file: mount it and set SONIC_CONFIG.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=8)"]
CMD ["waitress-serve", "--listen=0.0.0.0:8080", "--threads=48", "--asyncore-use-poll", "--call", "sonic_server.wsgi:make_app"]
