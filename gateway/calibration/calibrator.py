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
  share of the bad answers (`bad_recall`), or review at most a share of answers (`review_share`).

Until a variant has a calibrator, the formula is the score and `review.confidence_threshold` flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# the raw signals, in order; each is a number for every exchange (a missing signal has a neutral value)
FEATURES = ("mean_logprob", "min_logprob", "mean_entropy", "log_tokens", "truncated", "looping",
            "rag", "top_similarity", "similarity_gap", "entry_overlap")


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
    ]


@dataclass
class Calibrator:
    """A fitted calibrator, as stored (the `params` of a `calibrators` row)."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float
    variant: str = ""
    source: str = ""
    id: int | None = None

    def predict(self, parts: dict) -> float:
        x = (np.asarray(features(parts)) - np.asarray(self.mean)) / np.asarray(self.scale)
        z = float(np.dot(x, self.coef) + self.intercept)
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def params(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("id", "variant", "source")}

    @classmethod
    def from_params(cls, params: dict, **extra: object) -> "Calibrator":
        if list(params.get("features", [])) != list(FEATURES):
            raise ValueError(f"calibrator features {params.get('features')} do not match this version's {FEATURES}")
        return cls(**{k: params[k] for k in ("features", "mean", "scale", "coef", "intercept", "threshold")},
                   **extra)


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


def summary(scores: list[float], labels: list[bool], threshold: float | None = None) -> dict:
    out = {"n": len(labels), "good": int(sum(labels)), "auroc": auroc(scores, labels), "brier": brier(scores, labels),
           "reliability": reliability(scores, labels)}
    if threshold is not None:
        flagged = [x < threshold for x in scores]
        bad = [f for f, y in zip(flagged, labels) if not y]
        out["flagged_share"] = round(sum(flagged) / len(flagged), 4) if flagged else None
        out["bad_recall"] = round(sum(bad) / len(bad), 4) if bad else None
    return out


def fit(rows: list[tuple[dict, bool]], *, c: float, rule: str, target: float, min_per_class: int = 5,
        formula: list[float] | None = None, variant: str = "", source: str = "") -> Fit:
    """Fit on (confidence parts, good) rows. `formula`: the v2 scores of the same rows, reported
    beside the calibrated ones. Raises NotEnoughLabels when a class has fewer than `min_per_class`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = [bool(y) for _, y in rows]
    good = sum(labels)
    if min(good, len(labels) - good) < min_per_class:
        raise NotEnoughLabels(f"{good} good and {len(labels) - good} bad answers: at least {min_per_class} of each "
                              "are needed to fit a calibrator")
    x = np.asarray([features(p) for p, _ in rows], dtype=float)
    y = np.asarray(labels, dtype=int)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    folds = min(5, min(good, len(labels) - good))
    held_out = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                                 method="predict_proba")[:, 1].tolist()
    model.fit(x, y)
    scaler, logistic = model[0], model[1]
    threshold = choose_threshold(held_out, labels, rule, target)
    scale = [float(v) if v > 0 else 1.0 for v in scaler.scale_]
    calibrator = Calibrator(list(FEATURES), [float(v) for v in scaler.mean_], scale,
                            [float(v) for v in logistic.coef_[0]], float(logistic.intercept_[0]), threshold,
                            variant=variant, source=source)
    metrics = {"cross_validated": summary(held_out, labels, threshold), "folds": folds, "c": c,
               "rule": rule, "target": target,
               "coefficients": dict(zip(FEATURES, [round(v, 4) for v in calibrator.coef]))}
    if formula is not None:
        metrics["formula"] = summary(formula, labels)
    return Fit(calibrator, metrics)
