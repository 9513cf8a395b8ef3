"""Calibrated confidence: a regularised logistic regression from an exchange's raw signals to
P(the answer is good), fitted per served variant.

Why: the v2 formula (`gateway/chat/confidence.py`) is hand-weighted; its AUROC was 0.79 for the
bootstrap adapter with retrieval and *below chance* (0.43) without it. The signals are kept raw
with every exchange, so a calibrator can be fitted on verdicts, and refitted as verdicts arrive:

* where labels come from — at training time, the candidate's answers on the calibration split
  (seed Q&A never trained on, apart from the frozen evaluation split) scored against the
  references (good = embedding similarity ≥ 0.75, the evaluation's convention); later, reviewers'
  verdicts on the variant's exchanges (approve = good, correct/reject = bad), audit items included;
* the model: `StandardScaler` + `LogisticRegression(C)` from scikit-learn, stored as plain numbers
  (JSON, no pickle) and applied with one dot product at serving time;
* honest numbers: AUROC, Brier score and the reliability table are computed on cross-validated
  predictions (each label predicted by a model that did not see it), next to the formula's on the
  same rows;
* the flag threshold is chosen from the cross-validated scores for a configured target: catch a
  share of the bad answers (`bad_recall`), or review at most a share of answers (`review_share`);
* one model per retrieval mode (`calibration.per_mode`): answers with retrieval and without differ
  in which signals matter and in how often they are good. A pooled fit spends its weights on telling
  the modes apart, and its one threshold, chosen on a calibration mix that is half no-retrieval
  answers, flagged almost none of the bad answers *with* retrieval (bench/results/calibration.md).
  Each mode with `min_per_class` good and bad answers gets its own model and threshold, so the flag
  target holds whatever the traffic's mix; a mode without enough labels uses the pooled model.

Until a variant has a calibrator, the formula is the score and `review.confidence_threshold` flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# the raw signals, in order; each is a number for every exchange (a missing signal has a neutral value)
FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "log_tokens", "truncated", "looping",
            "rag", "top_similarity", "similarity_gap", "entry_overlap", "question_match")
MODES = ("rag", "no_rag")  # with retrieval (a top similarity was recorded) or without
_MODEL_KEYS = ("mean", "scale", "coef", "intercept", "threshold")


def mode_of(parts: dict) -> str:
    """The retrieval mode of one exchange's confidence parts."""
    return "rag" if parts.get("top_similarity") is not None else "no_rag"


def features(parts: dict) -> list[float]:
    """The feature vector of one exchange's stored confidence parts (`Confidence.parts()`)."""
    rag = parts.get("top_similarity") is not None
    top = parts.get("top_similarity") or 0.0
    second = parts.get("second_similarity")
    return [
        parts.get("mean_logprob") if parts.get("mean_logprob") is not None else -10.0,
        max(parts.get("min_logprob") if parts.get("min_logprob") is not None else -30.0, -30.0),
        parts.get("mean_entropy") if parts.get("mean_entropy") is not None else 0.0,
        math.log1p(parts.get("tokens") or 0),
        float(bool(parts.get("truncated"))),
        float(bool(parts.get("looping"))),
        float(rag),
        top,
        top - second if rag and second is not None else (top if rag else 0.0),
        parts.get("entry_overlap") or 0.0,
        # a plain-text entry has no question of its own: its chunk's similarity stands in
        parts["question_match"] if parts.get("question_match") is not None else top,
    ]


@dataclass
class Calibrator:
    """A fitted calibrator, as stored (the `params` of a `calibrators` row). The top-level numbers
    are the pooled model; `modes` holds a model of the same shape for each retrieval mode that had
    enough labels of its own (rows stored before per-mode fits have none: pooled only)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    modes: dict[str, dict] = field(default_factory=dict)
    variant: str = ""
    source: str = ""
    id: int | None = None

    def _pooled(self) -> dict:
        return {k: getattr(self, k) for k in _MODEL_KEYS}

    def _model(self, parts: dict) -> dict:
        return self.modes.get(mode_of(parts)) or self._pooled()

    def predict(self, parts: dict) -> float:
        return self._score(parts, self._model(parts))

    def predict_pooled(self, parts: dict) -> float:
        """The pooled model's score, whatever the mode (what a mode without its own model gets)."""
        return self._score(parts, self._pooled())

    @staticmethod
    def _score(parts: dict, m: dict) -> float:
        x = (np.asarray(features(parts)) - np.asarray(m["mean"])) / np.asarray(m["scale"])
        z = float(np.dot(x, m["coef"]) + m["intercept"])
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def threshold_for(self, parts: dict) -> float:
        """The flag threshold for this exchange: its mode's own, else the pooled one."""
        return float(self._model(parts)["threshold"])

    def thresholds(self) -> dict[str, float]:
        """Mode → the threshold that mode's answers are flagged under."""
        return {mode: float((self.modes.get(mode) or self._pooled())["threshold"]) for mode in MODES}

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("id", "variant", "source")}

    @classmethod
    def from_params(cls, params: dict, **extra: object) -> "Calibrator":
        """Read stored params; ValueError for anything this version cannot score with (a foreign
        feature list, a vector of the wrong length, a malformed mode), so a bad row is skipped, not
        served."""
        if not isinstance(params, dict) or list(params.get("features", [])) != list(FEATURES):
            features_seen = params.get("features") if isinstance(params, dict) else None
            raise ValueError(f"calibrator features {features_seen} do not match this version's {FEATURES}")
        stored_modes = params.get("modes") or {}
        if not isinstance(stored_modes, dict):
            raise ValueError("calibrator modes must be an object of retrieval mode → model")
        modes = {}
        for mode, model in stored_modes.items():
            if mode not in MODES:
                raise ValueError(f"calibrator mode {mode!r} is not one of {MODES}")
            modes[mode] = _checked(model, f"mode {mode!r}")
        return cls(list(FEATURES), **_checked(params, "pooled model"), modes=modes, **extra)


def _checked(model: object, what: str) -> dict:
    """One stored model's numbers, checked: three vectors as long as FEATURES, two numbers."""
    if not isinstance(model, dict) or any(k not in model for k in _MODEL_KEYS):
        raise ValueError(f"calibrator {what} needs {_MODEL_KEYS}")
    out = {}
    for key in ("mean", "scale", "coef"):
        vector = model[key]
        if (not isinstance(vector, list) or len(vector) != len(FEATURES)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vector)):
            raise ValueError(f"calibrator {what}: {key} must be {len(FEATURES)} finite numbers")
        out[key] = [float(v) for v in vector]
    if any(v == 0 for v in out["scale"]):
        raise ValueError(f"calibrator {what}: scale has a zero")
    for key in ("intercept", "threshold"):
        if not isinstance(model[key], (int, float)) or not math.isfinite(model[key]):
            raise ValueError(f"calibrator {what}: {key} must be a finite number")
        out[key] = float(model[key])
    return out


@dataclass
class Fit:
    calibrator: Calibrator
    metrics: dict = field(default_factory=dict)


class NotEnoughLabels(ValueError):
    pass


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    from sklearn.metrics import roc_auc_score
    return None if len(set(labels)) < 2 else round(float(roc_auc_score(labels, scores)), 4)


def brier(scores: list[float], labels: list[bool]) -> float:
    return round(float(np.mean((np.asarray(scores) - np.asarray(labels, dtype=float)) ** 2)), 4)


def reliability(scores: list[float], labels: list[bool], bins: int = 10) -> list[dict]:
    """Equal-width bins of the score: mean predicted vs observed share good (the reliability diagram)."""
    s, y = np.asarray(scores), np.asarray(labels, dtype=float)
    out = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        mask = (s >= lo) & ((s < hi) if i < bins - 1 else (s <= hi))
        if mask.any():
            out.append({"low": lo, "high": hi, "n": int(mask.sum()), "predicted": round(float(s[mask].mean()), 4),
                        "observed": round(float(y[mask].mean()), 4)})
    return out


def choose_threshold(scores: list[float], labels: list[bool], rule: str, target: float) -> float:
    """Flag when score < threshold. `bad_recall`: the lowest threshold that catches `target` of the
    bad answers; `review_share`: the threshold under which `target` of all answers fall."""
    s = np.sort(np.asarray(scores))
    if rule == "review_share":
        k = int(math.floor(target * len(s)))
        return float(s[k]) if k < len(s) else 1.0 + 1e-9
    bad = np.sort(np.asarray([x for x, y in zip(scores, labels) if not y]))
    if not len(bad):
        return 0.0
    k = min(len(bad) - 1, max(0, math.ceil(target * len(bad)) - 1))
    return float(bad[k]) + 1e-9  # the k-th lowest bad answer is flagged (strictly below)


def summary(scores: list[float], labels: list[bool], threshold: float | list[float] | None = None) -> dict:
    """AUROC, Brier and reliability of scores against labels; with a threshold (one for all rows, or
    one per row), the share flagged and the share of bad answers caught."""
    out = {"n": len(labels), "good": int(sum(labels)), "auroc": auroc(scores, labels), "brier": brier(scores, labels),
           "reliability": reliability(scores, labels)}
    if threshold is not None:
        per_row = threshold if isinstance(threshold, list) else [threshold] * len(scores)
        flagged = [x < t for x, t in zip(scores, per_row)]
        bad = [f for f, y in zip(flagged, labels) if not y]
        out["flagged_share"] = round(sum(flagged) / len(flagged), 4) if flagged else None
        out["bad_recall"] = round(sum(bad) / len(bad), 4) if bad else None
    return out


def _fit_one(x: np.ndarray, y: np.ndarray, c: float, rule: str, target: float) -> tuple[dict, list[float]]:
    """One logistic regression: its numbers (threshold from held-out scores) and the held-out scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    good = int(y.sum())
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    folds = min(5, min(good, len(y) - good))
    held_out = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                                 method="predict_proba")[:, 1].tolist()
    model.fit(x, y)
    scaler, logistic = model[0], model[1]
    numbers = {"mean": [float(v) for v in scaler.mean_], "scale": [float(v) if v > 0 else 1.0 for v in scaler.scale_],
               "coef": [float(v) for v in logistic.coef_[0]], "intercept": float(logistic.intercept_[0]),
               "threshold": choose_threshold(held_out, [bool(v) for v in y], rule, target), "folds": folds}
    return numbers, held_out


def fit(rows: list[tuple[dict, bool]], *, c: float, rule: str, target: float, min_per_class: int = 5,
        per_mode: bool = True, formula: list[float] | None = None, variant: str = "", source: str = "") -> Fit:
    """Fit on (confidence parts, good) rows: the pooled model, and with `per_mode` one model per
    retrieval mode that has `min_per_class` good and bad answers. `formula`: the v2 scores of the
    same rows, reported beside the calibrated ones. Raises NotEnoughLabels when a class has fewer
    than `min_per_class` overall."""
    labels = [bool(y) for _, y in rows]
    good = sum(labels)
    if min(good, len(labels) - good) < min_per_class:
        raise NotEnoughLabels(f"{good} good and {len(labels) - good} bad answers: at least {min_per_class} of each "
                              "are needed to fit a calibrator")
    x = np.asarray([features(p) for p, _ in rows], dtype=float)
    y = np.asarray(labels, dtype=int)
    pooled, held_out = _fit_one(x, y, c, rule, target)
    modes: dict[str, dict] = {}
    by_mode: dict[str, dict] = {}
    row_modes = [mode_of(p) for p, _ in rows]
    indices = {mode: [i for i, m in enumerate(row_modes) if m == mode] for mode in MODES}
    for mode, index in indices.items():
        mode_good = sum(labels[i] for i in index)
        own = per_mode and min(mode_good, len(index) - mode_good) >= min_per_class
        if own:
            numbers, mode_held_out = _fit_one(x[index], y[index], c, rule, target)
            modes[mode] = {k: numbers[k] for k in _MODEL_KEYS}
            for i, score in zip(index, mode_held_out):
                held_out[i] = score
        if index:
            by_mode[mode] = {"n": len(index), "good": mode_good, "own_model": own}
    calibrator = Calibrator(list(FEATURES), *(pooled[k] for k in _MODEL_KEYS), modes=modes, variant=variant,
                            source=source)
    thresholds = [calibrator.threshold_for(p) for p, _ in rows]
    for mode, info in by_mode.items():
        index = indices[mode]
        info["cross_validated"] = summary([held_out[i] for i in index], [labels[i] for i in index],
                                          [thresholds[i] for i in index])
        info["threshold"] = round(calibrator.thresholds()[mode], 6)
    metrics = {"cross_validated": summary(held_out, labels, thresholds), "folds": pooled["folds"], "c": c,
               "rule": rule, "target": target, "per_mode": per_mode, "modes": by_mode,
               "coefficients": dict(zip(FEATURES, [round(v, 4) for v in calibrator.coef]))}
    if formula is not None:
        metrics["formula"] = summary(formula, labels)
    return Fit(calibrator, metrics)
