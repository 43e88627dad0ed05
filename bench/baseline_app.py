"""The benchmark's baseline: a fine-tuned model in a plain transformers pipeline behind FastAPI.

Run by `bench.serve` as its own process under uvicorn (one worker):

    TEXTGATE_BASELINE_MODEL_DIR=<model dir> TEXTGATE_BASELINE_THREADS=2 \
        python -m uvicorn bench.baseline_app:app --workers 1

It answers `POST /classify {"texts": [...]}` with `[{"label", "score"}, ...]`, the same
contract as the bento, so one load driver measures both. Deliberately naive: fp32 on the CPU,
no batching across requests, and one pipeline call at a time (a single-thread executor queues
requests in arrival order, while the event loop keeps accepting connections). No textgate
cleaning and no temperature scaling: labels match the bento's on ordinary text, scores need not.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field
from transformers import pipeline

# Written by textgate's train stage; the baseline truncates like the bento does.
from textgate.artifacts import TRAINING_FILE

MODEL_DIR_ENV = "TEXTGATE_BASELINE_MODEL_DIR"
THREADS_ENV = "TEXTGATE_BASELINE_THREADS"


class ClassifyRequest(BaseModel):
    texts: list[str] = Field(min_length=1)


class Classification(BaseModel):
    label: str
    score: float


def load_pipeline(model_dir: str | Path, threads: int) -> Any:
    """A CPU fp32 text-classification pipeline over a textgate model directory."""
    torch.set_num_threads(threads)
    return pipeline(
        "text-classification", model=str(model_dir), tokenizer=str(model_dir), device=-1
    )


def max_length(model_dir: str | Path) -> int:
    """The token limit the model was trained with (the bento truncates to it too)."""
    metadata = json.loads((Path(model_dir) / TRAINING_FILE).read_text(encoding="utf-8"))
    return int(metadata["max_length"])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    model_dir = os.environ[MODEL_DIR_ENV]
    app.state.classifier = load_pipeline(model_dir, int(os.environ.get(THREADS_ENV, "1")))
    app.state.max_length = max_length(model_dir)
    # One thread: requests reach the pipeline one at a time, first come first served.
    app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
    yield
    app.state.executor.shutdown(wait=False, cancel_futures=True)


app = FastAPI(title="textgate benchmark baseline", lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/classify")
async def classify(body: ClassifyRequest, request: Request) -> list[Classification]:
    state = request.app.state

    def run() -> list[dict[str, Any]]:
        # A list input is still run text by text: the pipeline's batch_size defaults to 1.
        return state.classifier(body.texts, truncation=True, max_length=state.max_length)

    answers = await asyncio.get_running_loop().run_in_executor(state.executor, run)
    return [Classification(label=a["label"], score=a["score"]) for a in answers]
