"""Response models of the adapter endpoints (`/v1/adapters`), plus the decision record and the routing
split that the experiment endpoints share. They document the dicts `AdapterService` builds, key for key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class AdapterSummary(BaseModel):
    """One adapter version: state, lineage, gate results and how it serves now."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(description="v0001, v0002, ...")
    state: Literal["training", "candidate", "challenger", "champion", "retired", "failed"]
    parent: str | None = Field(description="the champion it was compared against when trained")
    initialised_from: str | None = Field(description="what training started from: 'base' or a version (warm start)")
    run_id: int | None = Field(description="the retraining run that produced it")
    base_model: str
    dataset_hash: str | None
    label_count: int = Field(description="resolved review labels in its dataset")
    train_examples: int
    reason: str | None = Field(description="why it stopped where it is (gate result, retirement, rollback)")
    gate: dict[str, dict[str, Any]] | None = Field(
        description="offline gate checks by name (rag, no_rag, forgetting): n, candidate_mean, baseline_mean, "
                    "mean_difference, interval, confidence, wins, losses, ties, sign_test_p, passed, rule; "
                    "null before the gate ran")
    loaded: bool = Field(description="loaded in the engine now")
    weight_bytes: int | None = Field(description="memory its weights take in the engine; null when not loaded")
    pinned_loaded: bool = Field(description="kept loaded by an admin for pinned requests (model: \"<version>\")")
    default: bool = Field(description="the champion: what the logical model name serves by default")
    traffic_share: float = Field(description="share of routing units it serves now (0..1)")
    created_at: str | None
    updated_at: str | None


class AdapterList(BaseModel):
    """GET /v1/adapters."""

    model_config = ConfigDict(extra="forbid")

    object: Literal["list"]
    default_variant: str = Field(description="the champion's version, or 'base'")
    data: list[AdapterSummary]


class AdapterDetail(AdapterSummary):
    """One version with its metrics, training config and files (GET /v1/adapters/{version} and the
    promote, retire, load and unload actions)."""

    metrics: dict[str, Any] = Field(description="training, evaluation and gate results")
    config: dict[str, Any] = Field(description="the training settings it was trained with")
    files: dict[str, str] = Field(description="file name → sha256")


class Decision(BaseModel):
    """A recorded change of who serves (or an evaluation that saw new evidence), with its evidence."""

    model_config = ConfigDict(extra="forbid")

    id: int
    experiment_id: int | None
    action: Literal["promote", "retire", "rollback", "continue"]
    version: str | None = Field(description="the version acted on")
    champion_before: str = Field(description="a version, or 'base'")
    champion_after: str = Field(description="a version, or 'base'")
    actor: str = Field(description="'scheduler', 'gate', 'gateway' or the admin key's name")
    automatic: bool
    reason: str
    evidence: dict[str, Any] = Field(
        description="what it was decided on: the experiment's arms and probabilities for the decision rule, "
                    "{'gate': ...} for a gate promotion, empty for a manual action")
    at: str | None


class RollbackResult(BaseModel):
    """POST /v1/adapters/rollback."""

    model_config = ConfigDict(extra="forbid")

    champion: str = Field(description="the restored champion: a version, or 'base'")
    default_variant: str
    decision: Decision


class Routing(BaseModel):
    """What the logical model name routes to now."""

    model_config = ConfigDict(extra="forbid")

    champion: str = Field(description="a version, or 'base'")
    challenger: str | None = Field(description="null when no experiment runs")
    challenger_share: float = Field(description="share of routing units (customers) sent to the challenger")
    experiment_id: int | None
    enabled: bool = Field(description="experiment.enabled: split traffic and let the scheduled job decide")
    sticky_by: list[str] = Field(description="routing units, in order: the request's user, else this header")


class LoadLoraAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter: vLLM's body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                           description="the model name requests will send")
    lora_path: str = Field(min_length=1, max_length=4096, description="a PEFT LoRA folder this server can read")
    load_inplace: bool = Field(False, description="replace an adapter already loaded under this name")


class UnloadLoraAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter: vLLM's body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = Field(None, description="accepted for vLLM compatibility, unused")
