"""Calibrated confidence vs the v2 formula: AUROC and Brier score for telling good answers
(similarity to the reference ≥ 0.75) from bad, per variant (the base model and the bootstrap
adapter), with and without retrieval, on question sets the calibrator never saw.

For each variant three calibrators are fitted the way the trainer fits one (`retraining/calibrate.py`)
on its answers to the calibration split (seed Q&A never trained on, apart from the frozen split):
pooled (one model for every answer), per retrieval mode (`calibration.per_mode`), and per mode with
the split's customer-style rewordings (`data/eval/calibration_reworded.jsonl`, answered with
retrieval) added to the fit, which is what the trainer now fits (`retraining.calibration_rewordings`).
All scores are then measured, in the same run, on
  * the frozen evaluation split (100 FAQ questions asked verbatim), and
  * customer-style rewordings of frozen questions (`data/eval/reworded_teacher.jsonl`, 30, hand-written):
    retrieval misses more on them, so confident wrong answers appear, and
  * the 126 rewordings of `tellerloop eval --set reworded` (`data/eval/reworded.jsonl`), retrieval on:
    more bad answers, so a steadier AUROC.

    .venv/bin/python bench/calibration.py [--data-dir .cache/bootstrap]

Needs a data dir where `bench/bootstrap.py` trained v0001, or `--adapter-dir data/adapters/bootstrap`
with any data dir (a fresh one gets the splits a fresh install makes). Answers are cached per adapter (the
trainer's evaluation cache), so a rerun only generates what is new. Writes
bench/results/calibration.{md,json} and calibration-v0001.svg.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


async def run(data_dir: Path, variants: list[str], adapter_dir: Path | None = None) -> dict:
    """`adapter_dir`: answer as v0001 with this adapter folder (e.g. the shipped one) instead of the
    data dir's registered v0001; the data dir still provides the splits, which depend only on the
    seed data."""
    from gateway.adapters.registry import AdapterRegistry
    from gateway.calibration.calibrator import reliability, summary
    from gateway.calibration.diagram import reliability_svg
    from gateway.core.runtime import build_engine, build_knowledge_base
    from gateway.core.settings import load_settings
    from gateway.store.db import create_engine, migrate, session_factory
    from retraining.calibrate import fit_from_evaluation
    from retraining.dataset import FrozenSplit, calibration_rewordings
    from retraining.evaluate import QA, evaluate
    from retraining.train import EvalCache

    settings = load_settings(None, storage={"data_dir": str(data_dir)})
    db = create_engine(settings.storage.resolved_database_url)
    await migrate(db)
    registry = AdapterRegistry(session_factory(db), settings.storage.data_dir)
    adapter = await registry.get("v0001")
    if adapter is not None:
        snap = settings.storage.data_dir / "datasets" / adapter.dataset_hash[:16]
        read = lambda name: [json.loads(x) for x in (snap / name).read_text().splitlines() if x.strip()]  # noqa: E731
        frozen = [QA(r["question"], r["answer"]) for r in read("eval.jsonl")]
        calibration = [QA(r["question"], r["answer"]) for r in read("calibration.jsonl")]
    elif adapter_dir is not None:  # a fresh data dir: the splits a fresh install makes from the seed data
        split = FrozenSplit.load_or_create(settings)
        frozen, calibration = split.qa_rows(), FrozenSplit.calibration(settings, split).qa_rows()
    else:
        raise SystemExit(f"no v0001 in {data_dir}: run bench/bootstrap.py there, or pass --adapter-dir")
    calibration_reworded = calibration_rewordings(settings, calibration)
    jsonl = lambda name: [QA(r["question"], r["answer"]) for r in  # noqa: E731
                          (json.loads(x) for x in (ROOT / "data/eval" / name).read_text().splitlines() if x.strip())]
    reworded, reworded_set = jsonl("reworded_teacher.jsonl"), jsonl("reworded.jsonl")
    kb = await asyncio.to_thread(build_knowledge_base, settings)
    embedder = kb.embedder
    engine = build_engine(settings)
    await engine.start()
    if adapter_dir is not None:
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(adapter_dir.iterdir())
                 if p.name != "manifest.json"}
        await engine.load_adapter("v0001", str(adapter_dir))
    else:
        files = adapter.files
        await engine.load_adapter("v0001", str(await registry.verify("v0001")))
    sets = {"calibration_rag": (calibration, True), "calibration_no_rag": (calibration, False),
            "calibration_reworded_rag": (calibration_reworded, True),
            "rag": (frozen, True), "no_rag": (frozen, False),
            "reworded_rag": (reworded, True), "reworded_no_rag": (reworded, False),
            "reworded_set_rag": (reworded_set, True)}
    started = time.perf_counter()
    out: dict = {"variants": {}, "sizes": {k: len(v[0]) for k, v in sets.items()}}
    curves = {}
    try:
        for variant in variants:
            cache = EvalCache(settings, variant, files if variant != "base" else None)
            items = {}
            for mode, (rows, rag) in sets.items():
                missing = [qa for qa in rows if cache.get(mode, qa.question) is None]
                if missing:
                    report = await evaluate(settings, engine, embedder, missing, kb=kb if rag else None, rag=rag,
                                            adapter=None if variant == "base" else variant,
                                            max_tokens=settings.retraining.eval_max_tokens)
                    for item in report["items"]:
                        cache.put(mode, item)
                    cache.save()
                items[mode] = [cache.get(mode, qa.question) for qa in rows]
            verbatim = items["calibration_rag"] + items["calibration_no_rag"]
            fit_on = {"pooled": verbatim, "per_mode": verbatim, "per_mode_reworded": verbatim + items["calibration_reworded_rag"]}
            frozen_items = {"rag": items["rag"], "no_rag": items["no_rag"]}  # the fit's own check, as the trainer's
            fits = {kind: fit_from_evaluation(settings, fit_on[kind], frozen_items, variant, per_mode=kind != "pooled")
                    for kind in KINDS}
            rows_out = {}
            for mode in NAMES:
                labels = [bool(i["good"]) for i in items[mode]]
                formula = [i["confidence"].get("formula", i["confidence"]["score"]) for i in items[mode]]
                rows_out[mode] = {"good_rate": sum(labels) / len(labels),
                                  "formula": summary(formula, labels, settings.review.confidence_threshold)}
                for kind, fitted in fits.items():
                    scores = [fitted.calibrator.predict(i["confidence"]) for i in items[mode]]
                    rows_out[mode][kind] = summary(scores, labels,
                                                   [fitted.calibrator.threshold_for(i["confidence"]) for i in items[mode]])
                    if variant == "v0001" and mode == "reworded_set_rag" and kind == "per_mode_reworded":
                        curves = {"calibrated (per mode, + rewordings)": reliability(scores, labels),
                                  "formula (v2)": reliability(formula, labels)}
            out["variants"][variant] = {kind: {"fit": f.metrics["cross_validated"], "labels": f.metrics["labels"],
                                               "coefficients": f.metrics["coefficients"], "modes": f.metrics["modes"],
                                               "thresholds": f.calibrator.thresholds()}
                                        for kind, f in fits.items()}
            out["variants"][variant]["sets"] = rows_out
            out.setdefault("fits", {})[variant] = fits["per_mode_reworded"]  # what the trainer fits
    finally:
        await engine.stop()
        await db.dispose()
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["svg"] = reliability_svg(curves, size=300, title="v0001, reworded evaluation set, retrieval on") if curves else None
    return out


# one model for every answer; one per retrieval mode (calibration.per_mode), fitted on the verbatim calibration
# split alone; the same with the split's rewordings added (retraining.calibration_rewordings, the product's fit)
KINDS = ("pooled", "per_mode", "per_mode_reworded")
KIND_NAMES = {"pooled": "pooled", "per_mode": "per mode", "per_mode_reworded": "per mode + rewordings"}
NAMES = {"rag": "frozen split, retrieval on", "no_rag": "frozen split, retrieval off",
         "reworded_rag": "rewordings, retrieval on", "reworded_no_rag": "rewordings, retrieval off",
         "reworded_set_rag": "the reworded evaluation set, retrieval on"}


def table(result: dict) -> str:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    pct = lambda m, k: "–" if m.get(k) is None else format(m[k], ".0%")  # noqa: E731
    names = ["formula (v2)"] + [KIND_NAMES[k] for k in KINDS]
    lines = ["| variant | questions | n | share good | " + " | ".join(f"AUROC {n}" for n in names) + " | "
             + " | ".join(f"Brier {n}" for n in names) + " | bad flagged (share flagged): formula @0.45 | "
             + " | ".join(KIND_NAMES[k] for k in KINDS) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join(["---:"] * 3 * len(names)) + " |"]
    for variant, v in result["variants"].items():
        for mode, s in v["sets"].items():
            scores = [s["formula"]] + [s[k] for k in KINDS]
            lines.append(f"| {variant} | {NAMES[mode]} | {scores[0]['n']} | {s['good_rate']:.0%} | "
                         + " | ".join(fmt(x["auroc"]) for x in scores) + " | "
                         + " | ".join(f"{x['brier']:.3f}" for x in scores) + " | "
                         + " | ".join(f"{pct(x, 'bad_recall')} ({pct(x, 'flagged_share')})" for x in scores) + " |")
    fits = []
    for variant, v in result["variants"].items():
        for kind in KINDS:
            k = v[kind]
            thresholds = ", ".join(f"{mode} {t:.3f}" for mode, t in k["thresholds"].items())
            fits.append(f"{variant} {KIND_NAMES[kind]}: {k['labels']['n']} calibration-split answers "
                        f"({k['labels']['good']} good), cross-validated AUROC {k['fit']['auroc']}, thresholds {thresholds}")
    return "\n".join(lines) + f"\n\nCalibrators: {'; '.join(fits)}. Run time {result['seconds']:.0f} s (answers cached per adapter)."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "bootstrap"))
    parser.add_argument("--variant", action="append", choices=["base", "v0001"],
                        help="measure only these (default: both)")
    parser.add_argument("--adapter-dir", help="answer as v0001 with this adapter folder (e.g. data/adapters/bootstrap)")
    parser.add_argument("--update-shipped", action="store_true",
                        help="with --adapter-dir data/adapters/bootstrap: store v0001's per-mode fit as the shipped "
                             "adapter's calibrator (its manifest)")
    args = parser.parse_args()
    adapter_dir = Path(args.adapter_dir).resolve() if args.adapter_dir else None
    result = asyncio.run(run(Path(args.data_dir), args.variant or ["base", "v0001"], adapter_dir))
    fits = result.pop("fits")
    if args.update_shipped:
        shipped = ROOT / "data" / "adapters" / "bootstrap"
        if adapter_dir != shipped.resolve() or "v0001" not in fits:
            raise SystemExit("--update-shipped needs --adapter-dir data/adapters/bootstrap and the v0001 variant")
        manifest_path = shipped / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        fitted = fits["v0001"]
        manifest["calibrator"] = {"params": fitted.calibrator.params(), "metrics": fitted.metrics,
                                  "labels": fitted.metrics["labels"]["n"], "good": fitted.metrics["labels"]["good"]}
        manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"stored the per-mode calibrator in {manifest_path}")
    text = table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if result.get("svg"):
        (RESULTS / "calibration-v0001.svg").write_text(result.pop("svg"))
    (RESULTS / "calibration.md").write_text(
        "# Calibrated confidence vs the v2 formula\n\n`python bench/calibration.py`. Good = similarity to the "
        "reference ≥ 0.75. Each variant's calibrator is fitted on its own calibration-split answers (never trained "
        "on, apart from the frozen split), with and without retrieval; the rows below are question sets it never "
        "saw. Pooled: one model and threshold for every answer; per mode (`calibration.per_mode`, the default): a "
        "model and threshold per retrieval mode, both fitted on the same answers in the same run. Bad flagged: share "
        "of bad answers under the flag threshold (formula: review.confidence_threshold 0.45; calibrated: the "
        "threshold for calibration.flag_target 0.8), and the share of all answers flagged.\n\n"
        + text + "\n\n![reliability](calibration-v0001.svg)\n")
    (RESULTS / "calibration.json").write_text(json.dumps(result, indent=1))
    print(text)


if __name__ == "__main__":
    main()
