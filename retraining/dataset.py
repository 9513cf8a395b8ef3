"""Training data from reviewed labels, plus seed Q&A replayed against forgetting.

* Reviewed examples: resolved items with an answer (approve/correct; rejects carry no answer), the
  conversation exactly as the model saw it (system prompt with the retrieved context when
  retrieval was on) followed by the resolved answer. Deduplicated by normalised question: the
  latest resolution wins.
* Seed examples: rows of `retraining.seed_data`, `replay_ratio` per reviewed example (all of them
  when bootstrapping), prompted the way serving would prompt them — with the retrieved entries in
  the system prompt when `context_in_prompts` is on.
* The frozen evaluation split (`<data_dir>/datasets/eval_split.jsonl`) is created once from
  `eval_seed_size` seed questions and only ever grows, by the resolved items whose question hash
  falls in `eval_share`. No training example may share a normalised question with it: violated
  → `LeakageError`, never a silent drop of the guard.
* Everything is PII-scrubbed; the snapshot is content-hashed for lineage.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.pii import scrub, scrub_messages
from gateway.prompting import build_messages
from gateway.rag.documents import normalise_question
from gateway.rag.knowledge import KnowledgeBase
from gateway.settings import PROJECT_ROOT, Settings
from retraining.evaluate import QA, load_qa

SPLIT_SEED = 20261121  # fixed forever: the frozen split must not move between runs


class DatasetError(Exception):
    pass


class LeakageError(DatasetError):
    pass


class DatasetTooSmall(DatasetError):
    pass


@dataclass
class Example:
    source: str  # "review" | "seed"
    question: str
    messages: list[dict[str, str]]  # ends with the assistant answer
    item_id: int | None = None


@dataclass
class Snapshot:
    hash: str
    path: Path
    train: list[Example]
    eval_rows: list[QA]
    label_count: int
    seed_count: int
    manifest: dict = field(default_factory=dict)


def question_key(text: str) -> str:
    return normalise_question(text)


def in_eval_share(question: str, share: float) -> bool:
    """Stable assignment of a resolved item's question to the evaluation split."""
    digest = hashlib.sha256(question_key(question).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def seed_path(settings: Settings) -> Path | None:
    if not settings.retraining.seed_data:
        return None
    path = Path(settings.retraining.seed_data)
    return path if path.is_absolute() else PROJECT_ROOT / path


class FrozenSplit:
    """The evaluation questions: created once, append-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.keys = {question_key(r["question"]) for r in self.rows}

    @classmethod
    def load_or_create(cls, settings: Settings) -> "FrozenSplit":
        split = cls(settings.storage.data_dir / "datasets" / "eval_split.jsonl")
        if not split.path.is_file():
            seeds = seed_path(settings)
            rows = load_qa(seeds, settings.retraining.eval_seed_size, SPLIT_SEED) if seeds else []
            for qa in rows:
                split.add({"question": qa.question, "answer": qa.answer, "source": "seed", "item_id": None})
            split.save()
        return split

    def add(self, row: dict) -> bool:
        key = question_key(row["question"])
        if key in self.keys:
            return False
        self.rows.append(row)
        self.keys.add(key)
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows), encoding="utf-8")
        tmp.replace(self.path)

    def qa_rows(self) -> list[QA]:
        return [QA(r["question"], r["answer"], r.get("source", "")) for r in self.rows]


def seed_messages(settings: Settings, question: str, answer: str, kb: KnowledgeBase | None) -> list[dict]:
    """The prompt serving would build for this question (with retrieved entries if configured)."""
    hits = None
    if settings.retraining.context_in_prompts and kb is not None:
        hits = [h for h in kb.search(question, settings.rag.top_k, -1.0) if h.score >= settings.rag.min_score]
    return build_messages(settings, [{"role": "user", "content": question}], hits) + [
        {"role": "assistant", "content": answer}]


def build(settings: Settings, resolved: list[tuple[int, str, list[dict], str]], kb: KnowledgeBase | None,
          *, bootstrap: bool = False) -> Snapshot:
    """`resolved`: (item_id, resolved_at ISO, messages as the model saw them, resolved answer), any order."""
    cfg = settings.retraining
    split = FrozenSplit.load_or_create(settings)
    reviewed: dict[str, Example] = {}
    for item_id, _, messages, answer in sorted(resolved, key=lambda r: (r[1], r[0])):
        question = scrub(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
        if not question.strip():
            continue
        if in_eval_share(question, cfg.eval_share):
            split.add({"question": question, "answer": scrub(answer), "source": "review", "item_id": item_id})
        key = question_key(question)
        if key in split.keys:
            reviewed.pop(key, None)
            continue
        reviewed[key] = Example("review", question, scrub_messages(messages) + [
            {"role": "assistant", "content": scrub(answer)}], item_id)  # later resolutions overwrite
    split.save()

    seeds = seed_path(settings)
    seed_rows = [qa for qa in (load_qa(seeds) if seeds else []) if question_key(qa.question) not in split.keys
                 and question_key(qa.question) not in reviewed]
    n_seed = len(seed_rows) if bootstrap else min(len(seed_rows), round(cfg.replay_ratio * len(reviewed)))
    chosen = random.Random(settings.training.seed).sample(seed_rows, n_seed) if n_seed < len(seed_rows) else seed_rows
    seen: set[str] = set()
    seed_examples = []
    for qa in chosen:
        key = question_key(qa.question)
        if key in seen:
            continue
        seen.add(key)
        seed_examples.append(Example("seed", scrub(qa.question), scrub_messages(seed_messages(settings, qa.question, qa.answer, kb))))
    train = list(reviewed.values()) + seed_examples

    leaked = [e.question for e in train if question_key(e.question) in split.keys]
    if leaked:
        raise LeakageError(f"{len(leaked)} training question(s) are in the frozen evaluation split, e.g. {leaked[0]!r}")
    if len(train) < cfg.min_examples:
        raise DatasetTooSmall(f"{len(train)} training examples; at least retraining.min_examples={cfg.min_examples} needed")

    eval_rows = split.qa_rows()
    train_lines = [json.dumps(asdict(e), ensure_ascii=False, sort_keys=True) + "\n" for e in train]
    eval_lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in split.rows]
    digest = hashlib.sha256("".join(train_lines).encode() + b"\x00" + "".join(eval_lines).encode()).hexdigest()
    folder = settings.storage.data_dir / "datasets" / digest[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(train_lines), encoding="utf-8")
    (folder / "eval.jsonl").write_text("".join(eval_lines), encoding="utf-8")
    manifest = {"hash": digest, "train_examples": len(train), "reviewed_examples": len(reviewed),
                "seed_examples": len(seed_examples), "eval_rows": len(eval_rows), "bootstrap": bootstrap,
                "context_in_prompts": cfg.context_in_prompts, "replay_ratio": cfg.replay_ratio}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Snapshot(digest, folder, train, eval_rows, len(reviewed), len(seed_examples), manifest)


def load_train(folder: Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
