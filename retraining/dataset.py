"""Training data from reviewed labels, plus seed Q&A replayed against forgetting.

* Reviewed examples: resolved items with an answer (approve/correct; rejects carry no answer), the
  conversation exactly as the model saw it (system prompt with the retrieved context when
  retrieval was on) followed by the resolved answer. Deduplicated by conversation: a single
  question keys on its normalised text, a follow-up on the whole conversation (so "yes please" in
  two conversations are two examples); the latest resolution wins.
* Two compositions (`retraining.mode`), both measured in bench/cycles.py:
  - `cumulative` (and every bootstrap): every reviewed example so far plus the whole seed set,
    trained from the base model;
  - `warm`: the examples the champion has not seen (its dataset manifest lists the reviews it
    knew) plus a replay of what it knew — earlier reviewed examples first, then seed Q&A —
    `max(min_replay, replay_ratio × new)` examples, trained on top of the champion's adapter.
* Seed examples are prompted the way serving would prompt them — with the retrieved entries in the
  system prompt when `context_in_prompts` is on; a missing knowledge base is then an error (never
  a silent fallback to bare questions).
* The frozen evaluation split (`<data_dir>/datasets/eval_split.jsonl`) is created once from
  `eval_seed_size` seed questions and only ever grows, by single-question resolved items whose
  question hash falls in `eval_share`. A training question that is a near-duplicate of a split
  question (character similarity of the normalised text ≥ `near_duplicate_similarity`) is dropped
  and counted; `check_leakage` re-checks the final set and raises `LeakageError`.
* A fixed sample of seed questions that training does use is the forgetting probe: the gate
  re-asks them to see that a candidate did not lose what the champion knew.
* Everything is PII-scrubbed (the bank's own numbers in `pii.keep_numbers` stay); the snapshot is
  content-hashed for lineage.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.chat.prompting import CONVERSATION_HEADER, build_messages, retrieval_query
from gateway.core.settings import PROJECT_ROOT, Settings
from gateway.knowledge.documents import DocumentError
from gateway.knowledge.store import REVIEWED_SOURCE
from retraining.evaluate import QA, load_qa

if TYPE_CHECKING:
    from gateway.knowledge.store import KnowledgeBase

SPLIT_SEED = 20261121  # fixed forever: the frozen split must not move between runs
CALIBRATION_SEED = 20261201  # fixed forever: the calibration split's seed questions
CONVERSATION_SEED = 20261216  # which seed examples get an earlier turn (retraining.conversation_share)
PROBE_SEED = 20261122  # fixed forever: the forgetting probe's seed questions


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
class Resolved:
    """A resolved review item as the dataset needs it."""

    item_id: int
    resolved_at: str  # ISO
    messages: list[dict]  # as the model saw them (system prompt with context, the conversation)
    answer: str
    conversation: list[dict] | None = None  # the earlier turns as the customer had them (exchanges.conversation)
    resolution: str = "correct"  # "correct": the reviewers wrote the answer; "approve": they kept the model's

    @property
    def review_key(self) -> str:
        """Identifies this resolution (a later re-resolution of the item is new again)."""
        return f"{self.item_id}@{self.resolved_at}"


@dataclass
class Snapshot:
    hash: str
    path: Path
    train: list[Example]
    eval_rows: list[QA]
    label_count: int
    seed_count: int
    manifest: dict = field(default_factory=dict)
    probe: list[QA] = field(default_factory=list)  # the forgetting probe (also probe.jsonl in the folder)
    calibration: list[QA] = field(default_factory=list)  # the calibration split (calibration.jsonl)
    calibration_reworded: list[QA] = field(default_factory=list)  # its rewordings (calibration_reworded.jsonl)


def question_key(text: str) -> str:
    """Normalised question: NFKC, case-folded, "&" read as "and", words of any script joined by
    single spaces. Never empty: text without a word character keys on its own digest."""
    folded = unicodedata.normalize("NFKC", text).casefold().replace("&", " and ")
    key = " ".join(re.findall(r"[^\W_]+", folded))
    return key or "#" + hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def last_question(messages: list[dict]) -> str:
    content = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return content.rsplit("Customer question: ", 1)[-1]  # rag.layout = "user" puts the context first


def conversation_key(messages: list[dict], conversation: list[dict] | None = None) -> str:
    """A single question keys on its text; a follow-up on every customer and assistant turn —
    sent as chat turns, quoted in the system prompt (`rag.history = "system"`), or, when the prompt
    holds only the question (`"query"`, `"last"`), the exchange's stored `conversation`."""
    turns = [m for m in [*(conversation or []), *messages] if m.get("role") in ("user", "assistant")]
    system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
    quoted = system.split(CONVERSATION_HEADER, 1)[1].split("\n\n", 1)[0] if CONVERSATION_HEADER in system else ""
    if sum(m["role"] == "user" for m in turns) <= 1 and not quoted:
        return question_key(last_question(messages))
    joined = "\x1f".join(([f"quoted:{question_key(quoted)}"] if quoted else [])
                          + [f"{m['role']}:{question_key(m.get('content', ''))}" for m in turns])
    return "conversation:" + hashlib.sha256(joined.encode()).hexdigest()[:24]


class NearDuplicates:
    """Normalised questions, and which of them a new one nearly repeats (difflib's ratio)."""

    def __init__(self, threshold: float, keys: set[str] | None = None) -> None:
        self.threshold = threshold
        self.keys: set[str] = set(keys or ())

    def add(self, key: str) -> None:
        self.keys.add(key)

    def match(self, key: str) -> str | None:
        if key in self.keys:
            return key
        if key.startswith(("#", "conversation:")):
            return None
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2(key)
        for other in self.keys:
            if other.startswith(("#", "conversation:")):
                continue
            matcher.set_seq1(other)
            if (matcher.real_quick_ratio() >= self.threshold and matcher.quick_ratio() >= self.threshold
                    and matcher.ratio() >= self.threshold):
                return other
        return None


def in_eval_share(question: str, share: float) -> bool:
    """Stable assignment of a resolved item's question to the evaluation split."""
    digest = hashlib.sha256(question_key(question).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < share


def seed_path(settings: Settings) -> Path | None:
    if not settings.retraining.seed_data:
        return None
    path = Path(settings.retraining.seed_data)
    return path if path.is_absolute() else PROJECT_ROOT / path


def calibration_rewordings(settings: Settings, calibration: list[QA]) -> list[QA]:
    """Customer-style rewordings of calibration-split questions (`retraining.calibration_rewordings`),
    each with its split question's reference answer. Verbatim FAQ questions almost always retrieve
    their own entry, so a calibrator fitted on them alone never sees a confident answer copied from
    the wrong entry, the commonest bad answer once customers use their own words."""
    name = settings.retraining.calibration_rewordings
    if not name or not calibration:
        return []
    path = Path(name) if Path(name).is_absolute() else PROJECT_ROOT / name
    if not path.is_file():
        raise DatasetError(f"retraining.calibration_rewordings: no such file {path} (\"\" fits calibrators on the "
                           "verbatim calibration split alone)")
    answers = {question_key(qa.question): qa.answer for qa in calibration}
    found = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, original = str(row["question"]), str(row["original"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"retraining.calibration_rewordings: {path} line {n} is not a JSON object with "
                               f"'question' and 'original' ({exc})") from exc
        if question_key(original) in answers:
            found.append(QA(question, answers[question_key(original)]))
    return found


class FrozenSplit:
    """The evaluation questions: created once, append-only."""

    def __init__(self, path: Path, threshold: float = 1.0) -> None:
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.index = NearDuplicates(threshold, {question_key(r["question"]) for r in self.rows})

    @classmethod
    def load_or_create(cls, settings: Settings) -> "FrozenSplit":
        split = cls(settings.storage.data_dir / "datasets" / "eval_split.jsonl",
                    settings.retraining.near_duplicate_similarity)
        if not split.path.is_file():
            seeds = seed_path(settings)
            rows = load_qa(seeds, settings.retraining.eval_seed_size, SPLIT_SEED) if seeds else []
            for qa in rows:
                split.add({"question": qa.question, "answer": qa.answer, "source": "seed", "item_id": None})
            split.save()
        return split

    @classmethod
    def calibration(cls, settings: Settings, frozen: "FrozenSplit") -> "FrozenSplit":
        """The calibration split: `calibration_seed_size` seed questions, apart from the frozen
        split and never trained on, on which every candidate's answers are scored against the
        references to fit its confidence calibrator (`retraining/calibrate.py`). Created once."""
        split = cls(settings.storage.data_dir / "datasets" / "calibration_split.jsonl",
                    settings.retraining.near_duplicate_similarity)
        if not split.path.is_file():
            seeds = seed_path(settings)
            pool = [qa for qa in (load_qa(seeds) if seeds else []) if frozen.covers(qa.question) is None]
            # a small FAQ keeps most of its rows for training
            size = min(settings.retraining.calibration_seed_size,
                       int(settings.retraining.calibration_max_share * len(pool)))
            for qa in random.Random(CALIBRATION_SEED).sample(pool, size):
                split.add({"question": qa.question, "answer": qa.answer, "source": "seed", "item_id": None})
            split.save()
        return split

    def covers(self, question: str) -> str | None:
        """The split question this one repeats or nearly repeats, if any."""
        return self.index.match(question_key(question))

    def add(self, row: dict) -> bool:
        if self.covers(row["question"]) is not None:
            return False
        self.rows.append(row)
        self.index.add(question_key(row["question"]))
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows), encoding="utf-8")
        tmp.replace(self.path)

    def qa_rows(self) -> list[QA]:
        return [QA(r["question"], r["answer"], r.get("source", "")) for r in self.rows]


def seed_messages(settings: Settings, question: str, answer: str, kb: KnowledgeBase | None,
                  history: list[dict] | None = None) -> list[dict]:
    """The prompt serving would build for this question (with retrieved entries if configured):
    searched with the same retrieval query, laid out the same way. `history`: earlier turns of a
    conversation (`retraining.conversation_share`). With `retraining.shuffle_entries` the entries
    come in a per-question random order, so the right one is not always [1]."""
    cfg = settings.retraining
    conversation = [*(history or []), {"role": "user", "content": question}]
    hits = None
    if cfg.context_in_prompts:
        if kb is None:
            raise DatasetError("retraining.context_in_prompts is on but the knowledge base is unavailable: "
                               "refusing to train or evaluate without the context serving shows")
        query = retrieval_query(conversation, settings.rag.query_turns)
        hits = [h for h in kb.search(query, cfg.train_top_k or settings.rag.top_k, -1.0)
                if h.score >= settings.rag.min_score]
        if cfg.shuffle_entries:
            random.Random(question_key(question)).shuffle(hits)  # the same order every run
    return build_messages(settings, conversation, hits) + [{"role": "assistant", "content": answer}]


def usable_seeds(settings: Settings, split: FrozenSplit, *held_out: FrozenSplit) -> tuple[list[QA], int]:
    """Seed rows that may be trained on (deduplicated, no near-duplicate of the frozen split or of
    another held-out split) and how many were dropped as near-duplicates of split questions."""
    seeds = seed_path(settings)
    rows, seen, near = [], set(), 0
    for qa in load_qa(seeds) if seeds else []:
        key = question_key(qa.question)
        if key in seen:
            continue
        seen.add(key)
        if any(s.covers(qa.question) is not None for s in (split, *held_out)):
            near += 1
            continue
        rows.append(qa)
    return rows, near


def forgetting_probe(settings: Settings, rows: list[QA]) -> list[QA]:
    """A fixed sample of the trainable seed rows (`usable_seeds`), re-asked by the gate to catch forgetting."""
    size = min(settings.retraining.forgetting_probe_size, len(rows))
    return random.Random(PROBE_SEED).sample(rows, size) if size else []


def check_leakage(train: list[Example], *splits: FrozenSplit) -> None:
    """The backstop: no training question may repeat or nearly repeat a held-out question."""
    leaked = [(e.question, hit) for e in train
              if not conversation_key(e.messages[:-1]).startswith("conversation:")  # follow-ups: never in the split
              for split in splits if (hit := split.covers(e.question)) is not None]
    if leaked:
        q, hit = leaked[0]
        raise LeakageError(f"{len(leaked)} training question(s) repeat frozen evaluation questions, "
                           f"e.g. {q!r} ~ {hit!r}")


def build(settings: Settings, resolved: list[Resolved], kb: KnowledgeBase | None, *, bootstrap: bool = False,
          parent_manifest: dict | None = None) -> Snapshot:
    """The training set for one run. `parent_manifest`: the dataset manifest of the adapter this run
    continues from (warm mode), whose `known_reviews` are not new."""
    cfg = settings.retraining
    scrubber = settings.pii.scrubber()
    split = FrozenSplit.load_or_create(settings)
    calibration = FrozenSplit.calibration(settings, split)
    reworded = calibration_rewordings(settings, calibration.qa_rows())
    # a customer's question much like a calibration rewording is held out with it (never trained on,
    # never published), or the calibrator would learn that rewordings are easy
    reworded_index = NearDuplicates(cfg.near_duplicate_similarity, {question_key(qa.question) for qa in reworded})
    warm = cfg.mode == "warm" and not bootstrap and parent_manifest is not None
    known = set(parent_manifest.get("known_reviews", [])) if warm else set()

    rows = sorted(resolved, key=lambda r: (r.resolved_at, r.item_id))
    questions = [scrubber.scrub(last_question(row.messages)) for row in rows]
    keys = [conversation_key(row.messages, row.conversation) for row in rows]
    for row, question, key in zip(rows, questions, keys):  # first the split grows (single questions only)...
        if question.strip() and not key.startswith("conversation:") and in_eval_share(question, cfg.eval_share):
            split.add({"question": question, "answer": scrubber.scrub(row.answer), "source": "review",
                       "item_id": row.item_id})
    split.save()
    by_key: dict[str, tuple[Resolved, Example]] = {}
    near_review = 0
    for row, question, key in zip(rows, questions, keys):  # ...then nothing it covers is trained on
        if not question.strip():
            continue
        if not key.startswith("conversation:") and (split.covers(question) or calibration.covers(question)
                                                     or reworded_index.match(question_key(question))):
            by_key.pop(key, None)
            near_review += 1
            continue
        example = Example("review", question, scrubber.scrub_messages(row.messages) + [
            {"role": "assistant", "content": scrubber.scrub(row.answer)}], row.item_id)
        by_key[key] = (row, example)  # later resolutions overwrite

    published = publish_reviewed_answers(settings, by_key, kb)
    new = [ex for row, ex in by_key.values() if row.review_key not in known]
    old = [ex for row, ex in by_key.values() if row.review_key in known]
    if not bootstrap and not new:
        raise DatasetTooSmall("no reviewed examples the champion has not learned yet: nothing new to train on "
                              "(a first adapter from the seed data alone is a bootstrap run)")
    reviewed_index = NearDuplicates(cfg.near_duplicate_similarity,
                                    {question_key(ex.question) for ex in new + old})
    seeds, near_seed = usable_seeds(settings, split, calibration)
    probe = forgetting_probe(settings, seeds)
    seeds = [qa for qa in seeds if reviewed_index.match(question_key(qa.question)) is None]  # the review wins
    rng = random.Random(settings.training.seed)
    if warm:
        n_replay = max(cfg.min_replay, round(cfg.replay_ratio * len(new)))
        old_replayed = rng.sample(old, min(len(old), n_replay // 2))
        n_seed = min(len(seeds), n_replay - len(old_replayed))
        reviewed = new + old_replayed
    else:
        reviewed = new + old
        n_seed = len(seeds)
    chosen = rng.sample(seeds, n_seed) if n_seed < len(seeds) else seeds
    earlier = random.Random(CONVERSATION_SEED)  # which seeds get an earlier turn, and which turn

    def history_for(qa: QA) -> list[dict] | None:
        if len(seeds) < 2 or earlier.random() >= cfg.conversation_share:
            return None
        other = earlier.choice(seeds)
        if other is qa:
            other = seeds[(seeds.index(qa) + 1) % len(seeds)]
        return [{"role": "user", "content": other.question}, {"role": "assistant", "content": other.answer}]

    seed_examples = [Example("seed", scrubber.scrub(qa.question),
                             scrubber.scrub_messages(seed_messages(settings, qa.question, qa.answer, kb,
                                                                   history_for(qa))))
                     for qa in chosen]
    train = reviewed + seed_examples
    check_leakage(train, split, calibration)
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
    (folder / "probe.jsonl").write_text("".join(json.dumps({"question": qa.question, "answer": qa.answer},
                                                           ensure_ascii=False) + "\n" for qa in probe), encoding="utf-8")
    (folder / "calibration.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                                      for r in calibration.rows), encoding="utf-8")
    (folder / "calibration_reworded.jsonl").write_text("".join(
        json.dumps({"question": qa.question, "answer": qa.answer}, ensure_ascii=False) + "\n" for qa in reworded),
        encoding="utf-8")
    known_after = sorted(known | {row.review_key for row, _ in by_key.values()})
    manifest = {"hash": digest, "mode": "warm" if warm else ("bootstrap" if bootstrap else "cumulative"),
                "train_examples": len(train), "new_reviewed_examples": len(new),
                "replayed_reviewed_examples": len(reviewed) - len(new), "seed_examples": len(seed_examples),
                "eval_rows": len(eval_rows), "calibration_rows": len(calibration.rows),
                "calibration_reworded_rows": len(reworded), "bootstrap": bootstrap,
                "dropped_near_duplicates": {"seed": near_seed, "review": near_review},
                "context_in_prompts": cfg.context_in_prompts, "replay_ratio": cfg.replay_ratio,
                "reviewed_answers_published": published,
                "known_reviews": known_after,
                "new_review_questions": [ex.question for ex in new]}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Snapshot(digest, folder, train, eval_rows, len(reviewed), len(seed_examples), manifest, probe,
                    calibration.qa_rows(), reworded)


_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z_]{1,15}\]")  # what the PII scrubber puts in place of a detected value


def publish_reviewed_answers(settings: Settings, by_key: dict[str, tuple[Resolved, Example]],
                             kb: KnowledgeBase | None) -> int:
    """Reviewers' corrections of single questions become knowledge-base entries
    (`retraining.reviewed_answers_to_kb`, source `REVIEWED_SOURCE`, the whole set replaced each run so
    a re-resolution replaces its entry), and those examples' prompts are rebuilt with it.

    Why: a correction usually marks a gap in the knowledge base, and a small adapter does not learn a
    new fact from a few dozen examples — trained on the prompt the model saw (a wrong entry) with the
    right answer, it learns to ignore its context instead, and grounding gets worse
    (bench/results/cycles.md, the knowledge-gap run). Published, the answer is retrieved for every
    variant from this run on, and the example teaches what serving will now show. Questions held
    out for evaluation never get here (they were dropped from `by_key`); follow-ups are not
    standalone questions and keep the prompt they had. Scrubbed like every training example."""
    if not settings.retraining.reviewed_answers_to_kb or kb is None:
        return 0
    # a correction that still carries a scrubbed placeholder ("[PHONE]", "[EMAIL]", ...) was about one
    # customer: it trains (scrubbed), but it is not shown to every customer as an entry
    chosen = {key: (row, ex) for key, (row, ex) in by_key.items()
              if not key.startswith("conversation:") and row.resolution == "correct"
              and not _PLACEHOLDER.search(ex.question + "\n" + ex.messages[-1]["content"])}
    lines = [json.dumps({"question": ex.question, "answer": ex.messages[-1]["content"]}, ensure_ascii=False)
             for _, ex in chosen.values()]
    if lines:
        data = ("\n".join(lines) + "\n").encode()
        try:  # not an upload: rag.max_document_bytes does not cap it
            kb.ingest_bytes(REVIEWED_SOURCE, data, max_bytes=len(data))
        except DocumentError as exc:
            raise DatasetError(f"retraining.reviewed_answers_to_kb: publishing {len(lines)} corrections failed ({exc})") from exc
    elif kb.count():
        kb.delete_source(REVIEWED_SOURCE)
    scrubber = settings.pii.scrubber()
    for _, ex in chosen.values():  # other retrieved entries are scrubbed like a seed example's
        ex.messages = scrubber.scrub_messages(seed_messages(settings, ex.question, ex.messages[-1]["content"], kb))
    return len(lines)


def load_manifest(data_dir: Path, dataset_hash: str | None) -> dict | None:
    if not dataset_hash:
        return None
    path = Path(data_dir) / "datasets" / dataset_hash[:16] / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_train(folder: Path) -> list[Example]:
    return [Example(**json.loads(line)) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
