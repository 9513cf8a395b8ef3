"""`tellerloop` console script. Long work shows progress; errors are one clear line and exit 2."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
from pathlib import Path

from pydantic import ValidationError


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _settings(args: argparse.Namespace):
    from gateway.core.settings import load_settings

    overrides: dict = {}
    if getattr(args, "host", None):
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if getattr(args, "data_dir", None):
        overrides.setdefault("storage", {})["data_dir"] = args.data_dir
    if getattr(args, "collection", None):
        overrides.setdefault("rag", {})["collection"] = args.collection
    try:
        return load_settings(args.config, **overrides)
    except (FileNotFoundError, ValidationError, ValueError) as exc:
        raise CliError(str(exc)) from None


def _serve(args: argparse.Namespace) -> int:
    from gateway.core.logging import configure_logging
    from gateway.core.security import UnsafeBindError, check_bind_safety

    settings = _settings(args)
    try:
        check_bind_safety(settings)
    except UnsafeBindError as exc:
        raise CliError(str(exc)) from None
    import uvicorn  # heavy imports (torch, transformers) only once the settings are known to be good

    from gateway.app import create_app

    configure_logging(settings.logging)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=settings.server.shutdown_grace_s)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM uvicorn stops accepting, lets in-flight streams finish (server.shutdown_grace_s),
        then re-raises the signal, which a supervisor reads as a crash: a drained SIGTERM exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202
            with super().capture_signals():
                yield
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    DrainingServer(config).run()
    return 0


def _progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="chunk", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def _open_kb(settings):
    from gateway.core.logging import configure_logging
    from gateway.core.runtime import build_knowledge_base

    configure_logging(settings.logging.model_copy(update={"level": "warning"}))
    return build_knowledge_base(settings, ingest_demo=False)  # the kb commands manage content explicitly


def _kb_ingest(args: argparse.Namespace) -> int:
    from gateway.knowledge.documents import SUPPORTED, DocumentError

    settings = _settings(args)
    path = Path(args.path)
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED) if path.is_dir() else [path]
    if not files:
        raise CliError(f"{path}: no supported files ({', '.join(sorted(SUPPORTED))})")
    kb = _open_kb(settings)
    failed = 0
    for file in files:
        bar, update = _progress(f"embedding {file.name}")
        try:
            result = kb.ingest_bytes(file.name, file.read_bytes(), args.format, progress=update)
            print(json.dumps(result.as_dict()))
        except DocumentError as exc:
            failed += 1
            print(f"tellerloop kb ingest: {exc}", file=sys.stderr)
        finally:
            bar.close()
    print(json.dumps({"collection": kb.collection_name, "chunks": kb.count()}))
    return 2 if failed else 0


def _kb_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_open_kb(_settings(args)).stats(), indent=1))
    return 0


def _kb_delete(args: argparse.Namespace) -> int:
    removed = _open_kb(_settings(args)).delete_source(args.source)
    if not removed:
        raise CliError(f"no documents from source '{args.source}'")
    print(json.dumps({"source": args.source, "deleted": removed}))
    return 0


async def _active_calibrator(settings, variant: str):  # noqa: ANN001, ANN202
    """The variant's active calibrator in this install's database, if there is one."""
    from gateway.calibration.repository import Calibrators
    from gateway.core.runtime import open_database

    if not settings.calibration.enabled:
        return None
    async with open_database(settings) as sessions:
        return (await Calibrators(sessions).active()).get(variant)


def _eval_rows(args: argparse.Namespace, settings) -> dict[str, list]:  # noqa: ANN001
    """The questions to ask, per set: the --data CSV and/or each --set (a data/eval set or a JSONL)."""
    from gateway.core.settings import PROJECT_ROOT
    from retraining.evaluate import EVAL_SETS, load_eval_set, load_qa

    sets: dict[str, list] = {}
    if args.data:
        if not Path(args.data).is_file():
            raise CliError(f"{args.data}: no such file")
        try:
            sets[Path(args.data).stem] = load_qa(args.data, args.limit, args.seed)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise CliError(f"{exc}" if "columns" in str(exc) else f"{args.data}: not a UTF-8 CSV ({exc})") from None
    for name in args.set or ():
        if name not in EVAL_SETS and not Path(name).is_file():
            raise CliError(f"--set {name}: neither one of {', '.join(EVAL_SETS)} nor a JSONL file")
        try:
            rows = load_eval_set(name, settings, PROJECT_ROOT)
        except (ValueError, KeyError, TypeError) as exc:  # includes JSON and UTF-8 errors
            raise CliError(f"--set {name}: not an evaluation set ({type(exc).__name__}: {exc})") from None
        if args.limit is not None and args.limit < len(rows):
            rows = random.Random(args.seed).sample(rows, args.limit)
        sets[Path(name).stem] = rows
    if not sets:
        raise CliError("give --data CSV and/or --set (verbatim, reworded, conversations, out_of_coverage or a JSONL)")
    for name, rows in sets.items():
        if not rows:
            raise CliError(f"{name}: no questions")
    return sets


def _eval(args: argparse.Namespace) -> int:
    from gateway.calibration.calibrator import reliability
    from gateway.calibration.diagram import reliability_svg
    from gateway.core.logging import configure_logging
    from gateway.core.runtime import build_engine, build_knowledge_base
    from gateway.engine.base import EngineError
    from gateway.engine.threads import in_own_thread, on_all_cores
    from retraining.evaluate import evaluate, sets_table

    settings = _settings(args)
    sets = _eval_rows(args, settings)  # a bad argument is refused before torch is imported (seconds)
    from gateway.knowledge.embeddings import Embedder
    configure_logging(settings.logging.model_copy(update={"level": "warning"}))
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)

    variants = args.adapter or ["base"]

    async def adapter_dirs() -> dict[str, str]:
        """Each named version's folder, its files checked against the registry's sha256 first."""
        from gateway.adapters.registry import AdapterRegistry, RegistryError
        from gateway.core.runtime import open_database

        named = [v for v in variants if v != "base"]
        if not named:
            return {}
        async with open_database(settings) as sessions:
            registry = AdapterRegistry(sessions, settings.storage.data_dir)
            try:
                return {v: str(await registry.verify(v)) for v in named}
            except RegistryError as exc:
                raise CliError(f"{exc} (see GET /v1/adapters)") from None

    async def run() -> dict[str, dict[str, dict]]:
        folders = await adapter_dirs()
        engine = build_engine(settings, borrowed=True)  # an upstream's other adapters are not ours to unload
        kb = await in_own_thread(on_all_cores(build_knowledge_base), settings) if args.rag else None
        embedder = kb.embedder if kb else Embedder(settings.rag.embedding_model)
        await engine.start()
        reports: dict[str, dict[str, dict]] = {}
        try:
            for version, folder in folders.items():
                await engine.load_adapter(version, folder)
            for variant in variants:
                calibrator = await _active_calibrator(settings, variant)
                for name, rows in sets.items():
                    bar, update = _progress(f"{variant}: {name}")
                    bar.unit = "question"
                    try:
                        reports.setdefault(variant, {})[name] = await evaluate(
                            settings, engine, embedder, rows, kb=kb, rag=args.rag,
                            adapter=None if variant == "base" else variant, max_tokens=args.max_tokens,
                            concurrency=args.concurrency, progress=update, calibrator=calibrator)
                    finally:
                        bar.close()
            return reports
        finally:
            try:
                for version in folders:
                    await engine.unload_adapter(version)
            finally:
                await engine.stop()

    try:
        reports = asyncio.run(run())
    except EngineError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    several = len(reports) > 1 or len(sets) > 1
    for variant, by_set in reports.items():
        for name, report in by_set.items():
            report["config"].update(set=name, seed=args.seed,
                                    data=args.data if name == Path(args.data or "").stem else name)
            generated = [i for i in report["items"] if not i.get("fallback")]  # as in the summary
            curves = {"confidence": report["summary"]["reliability"]}
            if report["config"]["calibrator"] is not None:  # the formula beside the calibrated score
                curves["formula (v2)"] = reliability([i["confidence"]["formula"] for i in generated],
                                                     [i["good"] for i in generated])
            svg = out.with_suffix(f".{variant}.{name}.reliability.svg" if several else ".reliability.svg")
            svg.write_text(reliability_svg(curves, title=f"{variant} on {name}: reliability"))
            report["config"]["reliability_svg"] = str(svg)
    if not several:  # one variant on one set: the report as before
        report = next(iter(next(iter(reports.values())).values()))
        out.write_text(json.dumps(report, indent=1))
        print(json.dumps({"config": report["config"], "summary": report["summary"], "seconds": report["seconds"]},
                         indent=1))
        return 0
    out.write_text(json.dumps({"variants": reports}, indent=1))
    print(sets_table(reports))
    return 0


def _export(args: argparse.Namespace) -> int:
    """Resolved review items as chat JSONL, read straight from the database (no server needed)."""
    from gateway.core.runtime import open_database
    from gateway.review.repository import ReviewRepository
    from gateway.review.service import ReviewService

    settings = _settings(args)
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"{out}: is a directory; give a file name such as reviewed.jsonl")
    if not out.parent.exists():
        raise CliError(f"{out.parent}: no such directory")

    async def run() -> int:
        async with open_database(settings) as sessions:
            service = ReviewService(settings, ReviewRepository(sessions, settings.review), lambda: None)
            tmp = out.with_name(out.name + ".tmp")
            n = 0
            with tmp.open("w", encoding="utf-8") as fh:
                async for line in service.export_lines():
                    fh.write(line)
                    n += 1
            tmp.replace(out)  # a reader never sees a half-written export
            return n

    try:
        n = asyncio.run(run())
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. an unreachable database URL
        raise CliError(f"export failed: {type(exc).__name__}: {exc}") from None
    print(json.dumps({"out": str(out), "items": n}))
    return 0


def _retrain(args: argparse.Namespace) -> int:
    """Without --now: say whether a run is due. With --now: run one cycle in the foreground (works
    with the gateway stopped; beside a running gateway, the database keeps it to one run at a time)."""
    for name in ("max_steps", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    from gateway.core.logging import configure_logging
    from gateway.core.runtime import build_knowledge_base, open_database
    from gateway.engine.threads import in_own_thread, on_all_cores
    from gateway.runs.control import Retrainer, RunRefused

    settings = _settings(args)
    overrides = {k: v for k, v in {"max_steps": args.max_steps, "epochs": args.epochs,
                                   "quantization": args.quantization}.items() if v is not None}
    configure_logging(settings.logging.model_copy(update={"level": "warning"}))

    async def run() -> int:
        async with open_database(settings) as sessions:
            kb_box: list = [None]
            retrainer = Retrainer(settings, sessions, kb=lambda: kb_box[0])
            if not args.now:
                try:
                    await retrainer.check_due(args.force)
                    reason = None
                except RunRefused as exc:
                    reason = str(exc)
                print(json.dumps({"due": reason is None, "reason": reason, "new_labels": await retrainer.new_labels(),
                                  "min_new_labels": settings.retraining.min_new_labels,
                                  "bootstrap": await retrainer.bootstrap_due()}))
                return 0
            kb_box[0] = await in_own_thread(on_all_cores(build_knowledge_base), settings)  # the gate evaluates with retrieval
            try:
                started = await retrainer.start("cli", "cli", overrides, force=args.force)
            except RunRefused as exc:
                raise CliError(str(exc)) from None
            if started.status == "failed":
                raise CliError(f"run {started.id} failed: {started.error}")
            bar, update = _progress(f"run {started.id} → {started.adapter_version}")
            bar.unit = "step"
            while retrainer.tasks:
                await asyncio.sleep(2)
                current = await retrainer.runs.get(started.id)
                p = current.progress or {}
                if p.get("total_steps"):
                    update(p.get("step", 0), p["total_steps"])
                    bar.set_postfix_str(f"loss={p.get('loss')} eta={p.get('eta_s')}s")
                elif p.get("phase"):
                    bar.set_description_str(f"run {started.id}: {p['phase']}")
            bar.close()
            await retrainer.wait()
            final = await retrainer.runs.get(started.id)
            adapter = await retrainer.registry.get(final.adapter_version)
            print(json.dumps({"run": final.id, "status": final.status, "error": final.error,
                              "adapter": adapter.version, "state": adapter.state, "reason": adapter.reason,
                              "gate": (final.metrics or {}).get("gate", {}).get("checks")}, indent=1))
            return 0 if final.status == "succeeded" else 1

    return asyncio.run(run())


def _serving(args: argparse.Namespace) -> int:
    """promote / rollback / retire / experiments: decisions go to the database; a running gateway
    follows within experiment.sync_interval_s (no restart, in-flight requests finish)."""
    from gateway.adapters.registry import AdapterCorrupt, AdapterRegistry, RegistryError
    from gateway.core.logging import configure_logging
    from gateway.core.runtime import open_database
    from gateway.experiments.repository import (
        Experiments,
        decision_dict,
        experiment_dict,
    )

    settings = _settings(args)
    configure_logging(settings.logging)
    actor = f"cli:{args.actor}"

    async def run() -> dict:
        try:
            async with open_database(settings) as sessions:
                experiments = Experiments(settings, sessions, AdapterRegistry(sessions, settings.storage.data_dir))
                if args.command in ("promote", "retire"):
                    if await experiments.registry.get(args.version) is None:
                        raise CliError(f"no adapter version '{args.version}' (see GET /v1/adapters)")
                    act = experiments.promote if args.command == "promote" else experiments.retire
                    adapter = await act(args.version, actor)
                    return {"version": adapter.version, "state": adapter.state, "reason": adapter.reason,
                            "champion": await experiments.champion_name()}
                if args.command == "rollback":
                    return {"champion": await experiments.rollback(actor)}
                if args.evaluate:
                    return await experiments.evaluate(actor)
                running = await experiments.running()
                return {"champion": await experiments.champion_name(),
                        "running": experiment_dict(running) if running else None,
                        "decisions": [decision_dict(d) for d in await experiments.decisions(limit=10, include_continue=False)]}
        except AdapterCorrupt as exc:
            raise CliError(f"refused: {exc}") from None
        except RegistryError as exc:
            raise CliError(str(exc)) from None

    print(json.dumps(asyncio.run(run()), indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tellerloop", description="Self-improving banking support chatbot gateway")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file layered over config/default.toml")
    common.add_argument("--data-dir", help="overrides storage.data_dir")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="serve the OpenAI-compatible gateway")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    kb = sub.add_parser("kb", help="knowledge base: ingest, stats, delete").add_subparsers(dest="kb_command", required=True)
    ingest = kb.add_parser("ingest", parents=[common], help="ingest a file or every supported file in a directory")
    ingest.add_argument("path")
    ingest.add_argument("--collection", help="overrides rag.collection")
    ingest.add_argument("--format", choices=["text", "markdown", "csv", "jsonl"], help="instead of the extension")
    ingest.set_defaults(func=_kb_ingest)
    stats = kb.add_parser("stats", parents=[common], help="chunks per source")
    stats.add_argument("--collection")
    stats.set_defaults(func=_kb_stats)
    delete = kb.add_parser("delete", parents=[common], help="delete every chunk of one source (file name)")
    delete.add_argument("source")
    delete.add_argument("--collection")
    delete.set_defaults(func=_kb_delete)

    retrain = sub.add_parser("retrain", parents=[common], help="is a retraining run due? --now runs one cycle")
    retrain.add_argument("--now", action="store_true", help="run a cycle now, in the foreground, with progress")
    retrain.add_argument("--force", action="store_true", help="even with fewer than retraining.min_new_labels new labels")
    retrain.add_argument("--max-steps", type=int, help="cap optimizer steps (overrides training.max_steps)")
    retrain.add_argument("--epochs", type=int)
    retrain.add_argument("--quantization", choices=["4bit", "none"])
    retrain.set_defaults(func=_retrain)

    export = sub.add_parser("export", parents=[common], help="resolved review items as chat-format JSONL")
    export.add_argument("--out", required=True, help="file to write (replaced atomically)")
    export.set_defaults(func=_export)

    for name, what in (("promote", "make an adapter version the champion (ends its experiment)"),
                       ("retire", "stop serving a challenger or candidate")):
        cmd = sub.add_parser(name, parents=[common], help=what)
        cmd.add_argument("version", help="e.g. v0002")
        cmd.add_argument("--actor", default="admin", help="recorded with the decision")
        cmd.set_defaults(func=_serving)
    rollback = sub.add_parser("rollback", parents=[common], help="the champion goes back to the one it replaced")
    rollback.add_argument("--actor", default="admin", help="recorded with the decision")
    rollback.set_defaults(func=_serving)
    experiments = sub.add_parser("experiments", parents=[common], help="the running A/B experiment and recent decisions")
    experiments.add_argument("--evaluate", action="store_true", help="apply the decision rule now and act on it")
    experiments.add_argument("--actor", default="admin", help="recorded with the decision")
    experiments.set_defaults(func=_serving)

    ev = sub.add_parser("eval", parents=[common], help="answer quality on a Q&A CSV and/or the evaluation sets "
                                                      "(similarity, good share, retrieval hits, fallback rate, AUROC)")
    ev.add_argument("--data", help="CSV with question,answer[,category]")
    ev.add_argument("--set", action="append", metavar="NAME",
                    help="an evaluation set: verbatim, reworded, conversations, out_of_coverage (data/eval) or a "
                         "JSONL of the same shape; repeat for several, reported side by side")
    ev.add_argument("--rag", action=argparse.BooleanOptionalAction, default=True)
    ev.add_argument("--adapter", action="append", metavar="VERSION",
                    help="adapter version to evaluate ('base': the base model, the default); repeat to compare, "
                         "e.g. --adapter base --adapter v0001")
    ev.add_argument("--limit", type=int, help="a seeded random sample of this many rows")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-tokens", type=int, help="default: model.default_max_tokens")
    ev.add_argument("--concurrency", type=int, default=8)
    ev.add_argument("--out", required=True, help="report JSON path")
    ev.set_defaults(func=_eval)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print(f"tellerloop {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
