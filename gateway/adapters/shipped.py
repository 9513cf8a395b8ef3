"""The shipped adapter: the fine-tuned bootstrap adapter that comes with tellerloop, so a newcomer's
first answer is the fine-tuned bot's, not the base model's.

`data/adapters/bootstrap/` holds the LoRA files the project's own pipeline produced (`make
bench-bootstrap` → `bench/bootstrap.py --ship`) and `manifest.json`: the base model it was trained
on and that model's sha256, the seed data's sha256, the training config, the dataset's counts, the
offline evaluation and gate, the calibrator fitted on the calibration split, and each file's sha256.

On a start with an empty registry (`install`), the manifest is checked against this install — the
configured base model's hash and the seed data's hash must match — then every file is verified by
sha256, copied to `<data_dir>/adapters/<version>` and registered as the champion with lineage
saying it was shipped, and its calibrator becomes the version's active one. When it does not fit
(another base model, other seed data, a changed file), the reason is logged and the scheduled
bootstrap trains one in place instead, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import structlog

from gateway.adapters.registry import AdapterRegistry, file_checksums
from gateway.calibration.calibrator import Calibrator, Fit
from gateway.calibration.repository import Calibrators
from gateway.core.settings import PROJECT_ROOT, Settings

log = structlog.get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
EMBEDDED = "embedded SmolLM2-135M-Instruct"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _project_path(value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else PROJECT_ROOT / path


def base_model_identity(settings: Settings) -> dict:
    """The configured base model's name and a sha256 of its weights (the embedded GGUF, or a local
    model folder's config and weight files)."""
    from gateway.engine.model_files import COMPLETE_MARKER as CONVERTED_MARKER
    from gateway.engine.model_files import (
        EMBEDDED_GGUF,
        embedded_gguf_path,
        resolve_base_model,
    )

    name = settings.model.base or EMBEDDED
    if not settings.model.base:
        return {"name": name, "sha256": _sha256(embedded_gguf_path())}
    folder = Path(resolve_base_model(settings.model.base, settings.storage.data_dir))
    marker = folder / CONVERTED_MARKER
    if marker.is_file() and EMBEDDED_GGUF in marker.read_text(encoding="utf-8"):
        # our own conversion of the embedded GGUF (a copy of `make serve`'s model): the same model
        return {"name": EMBEDDED, "sha256": _sha256(embedded_gguf_path())}
    digest = hashlib.sha256()
    for path in sorted([folder / "config.json", *folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        if path.is_file():
            digest.update(f"{path.name}:{_sha256(path)}\n".encode())
    return {"name": name, "sha256": digest.hexdigest()}


def seed_identity(settings: Settings) -> dict | None:
    if not settings.retraining.seed_data:
        return None
    path = _project_path(settings.retraining.seed_data)
    return {"path": settings.retraining.seed_data, "sha256": _sha256(path)} if path.is_file() else None


def shipped_folder(settings: Settings) -> Path | None:
    value = settings.retraining.shipped_adapter
    return _project_path(value) if value else None


def read_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder / MANIFEST}: manifest format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def why_not(settings: Settings, folder: Path) -> str | None:
    """None when the shipped adapter fits this install, else the reason it does not."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return f"no readable manifest: {exc}"
    base = base_model_identity(settings)
    if manifest["base_model"]["sha256"] != base["sha256"]:
        return (f"trained on {manifest['base_model']['name']} ({manifest['base_model']['sha256'][:12]}), "
                f"the configured base model is {base['name']} ({base['sha256'][:12]})")
    seed = seed_identity(settings)
    if (manifest.get("seed_data") or {}).get("sha256") != (seed or {}).get("sha256"):
        return "trained on other seed data than retraining.seed_data"
    actual = file_checksums(folder)
    for name, digest in manifest["files"].items():
        if actual.get(name) != digest:
            return f"file {name!r} is missing or does not match its sha256 in the manifest"
    return None


async def install(settings: Settings, registry: AdapterRegistry, calibrators: Calibrators) -> str | None:
    """Register the shipped adapter as the champion of an empty registry; the version, or None."""
    folder = shipped_folder(settings)
    if folder is None or not folder.is_dir() or await registry.list():
        return None
    reason = await asyncio.to_thread(why_not, settings, folder)  # hashes the base model's weights
    if reason is not None:
        log.warning("adapter.shipped_skipped", folder=str(folder), reason=reason)
        return None
    manifest = read_manifest(folder)
    row = await registry.create(run_id=None, base_model=manifest["base_model"]["name"], parent=None,
                                config={**manifest.get("training", {}), "shipped": True,
                                        "initialised_from": "base", "mode": "shipped"})
    target = registry.path(row.version)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in manifest["files"]:
        shutil.copy2(folder / name, target / name)
    files = await registry.seal(row.version)
    if files != manifest["files"]:
        shutil.rmtree(target, ignore_errors=True)
        await registry.transition(row.version, "failed", reason="shipped files changed while being copied")
        return None
    dataset = manifest.get("dataset", {})
    await registry.update(row.version, dataset_hash=dataset.get("hash"), train_examples=dataset.get("train_examples", 0),
                          metrics={**manifest.get("metrics", {}), "shipped": {"base_model": manifest["base_model"],
                                                                             "seed_data": manifest.get("seed_data"),
                                                                             "created_at": manifest.get("created_at")}})
    await registry.transition(row.version, "candidate")
    await registry.transition(row.version, "champion",
                              reason=f"shipped with tellerloop (trained {manifest.get('created_at', '?')} on "
                                     f"{manifest['base_model']['name']}; offline gate: {manifest.get('gate_reason', 'n/a')})")
    cal = manifest.get("calibrator")
    if cal and settings.calibration.enabled:
        try:
            calibrator = Calibrator.from_params(cal["params"])
            await calibrators.add(row.version, "shipped", Fit(calibrator, cal.get("metrics", {})),
                                  cal.get("labels", 0), cal.get("good", 0))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("calibration.shipped_skipped", reason=str(exc))
    log.info("adapter.shipped_installed", version=row.version, folder=str(folder))
    return row.version


def export(settings: Settings, adapter_folder: Path, out: Path, *, training: dict, dataset: dict, metrics: dict,
           gate_reason: str, calibrator: dict | None) -> dict:
    """Write a trained adapter as the shipped one: its weight/config files and the manifest."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter_folder / name, tmp / name)
    manifest = {"format": FORMAT, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "reproduce": "make bench-bootstrap (bench/bootstrap.py --ship)",
                "base_model": base_model_identity(settings), "seed_data": seed_identity(settings),
                "training": training, "dataset": dataset, "metrics": metrics, "gate_reason": gate_reason,
                "calibrator": calibrator, "files": file_checksums(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest
