"""The model registry's records and where they are kept.

A record is the desired state of one model (its spec, as in KFServing's
TrainedModel) plus what the controller learned and decided about it:
measured memory, status conditions with reasons and transition times, and
the last events. Copies are not persisted: after a restart the controller
reads them back from each replica's repository index, the only truth about
what a Triton server has loaded.

Store: one JSON object per model in the object store
(``<artifact_bucket>/<registry_prefix><name>.json``). The store is already
a dependency of every deployment (SeaweedFS locally, MinIO with a
PersistentVolumeClaim in Kubernetes), writes of one object are atomic, and
the controller is the single writer (one replica), so it needs no database,
no lease and no CRD machinery.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from flotilla.common import metrics
from flotilla.common.ids import shorten
from flotilla.common.object_store import ObjectStore
from flotilla.config import ModelSettings
from flotilla.errors import InvalidArgument

MAX_EVENTS = 50
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# Condition types, as the issue names them.
FRAMEWORK_SUPPORTED = "FrameworkSupported"
ARTIFACT_AVAILABLE = "ArtifactAvailable"
MEMORY_AVAILABLE = "MemoryResourceAvailable"
LOADED = "Loaded"
READY = "Ready"
SPEC_MATCHES_GRAPH = "SpecMatchesGraph"
"""The spec fits every version's model.onnx; its message says which settings were read from the graph."""


def check_model_name(name: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        shown = shorten(name, 70)
        raise InvalidArgument(
            f"model name {shown!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (it names a Service in Kubernetes)"
        )


def parse_spec(spec_json: str) -> ModelSettings:
    """A validated spec; INVALID_ARGUMENT naming each bad field otherwise."""
    try:
        return ModelSettings.model_validate_json(spec_json or "{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid model spec: {problems}") from exc


@dataclass
class Condition:
    type: str
    status: str
    """"True", "False" or "Unknown"."""
    reason: str
    message: str
    last_transition_unix_s: float
    replica: str = ""


@dataclass
class Event:
    unix_s: float
    kind: str
    message: str


@dataclass
class ModelRecord:
    name: str
    spec: ModelSettings
    manifest: dict[str, dict[str, object]] = field(default_factory=dict)
    measured_memory_mb: float | None = None
    conditions: dict[tuple[str, str], Condition] = field(default_factory=dict)
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    batchers: list[str] = field(default_factory=list)
    """Where the model's batchers listen (persisted: routes survive a controller restart)."""
    committed: bool = False
    """False while a deploy is still placing its first copies (invisible to the fleet)."""

    @property
    def memory_mb(self) -> float:
        """What one copy takes for placement: measured when known, else declared."""
        return self.measured_memory_mb if self.measured_memory_mb is not None else self.spec.memory_mb

    def set_condition(self, type_: str, status: bool | None, reason: str, message: str, replica: str = "") -> None:
        text = "Unknown" if status is None else str(bool(status))
        key = (type_, replica)
        old = self.conditions.get(key)
        changed_s = old.last_transition_unix_s if old is not None and old.status == text else time.time()
        self.conditions[key] = Condition(type_, text, reason, message, changed_s, replica)

    def drop_condition(self, type_: str, replica: str) -> None:
        self.conditions.pop((type_, replica), None)

    def event(self, kind: str, message: str) -> None:
        self.events.append(Event(time.time(), kind, message))
        metrics.CONTROLLER_EVENTS.labels(self.name, kind).inc()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec.model_dump(mode="json"),
            "manifest": self.manifest,
            "measured_memory_mb": self.measured_memory_mb,
            "conditions": [c.__dict__ for c in self.conditions.values()],
            "events": [e.__dict__ for e in self.events],
            "batchers": self.batchers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        record = cls(
            name=data["name"],
            spec=ModelSettings.model_validate(data["spec"]),
            manifest=data.get("manifest", {}),
            measured_memory_mb=data.get("measured_memory_mb"),
            batchers=list(data.get("batchers", [])),
            committed=True,
        )
        for c in data.get("conditions", []):
            condition = Condition(**c)
            record.conditions[(condition.type, condition.replica)] = condition
        record.events.extend(Event(**e) for e in data.get("events", []))
        return record


class RecordStore(Protocol):
    def load_all(self) -> list[dict[str, Any]]: ...

    def save(self, name: str, data: dict[str, Any]) -> None: ...

    def delete(self, name: str) -> None: ...


class ObjectStoreRecords:
    """Records as ``<prefix><name>.json`` objects (blocking; call from a thread)."""

    MAX_RECORD_BYTES = 4 * 1024 * 1024

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def load_all(self) -> list[dict[str, Any]]:
        self.store.ensure_bucket()
        return [
            json.loads(self.store.get(key, self.MAX_RECORD_BYTES))
            for key in self.store.list_keys(self.prefix)
            if key.endswith(".json")
        ]

    def save(self, name: str, data: dict[str, Any]) -> None:
        self.store.put(f"{self.prefix}{name}.json", json.dumps(data).encode(), content_type="application/json")

    def delete(self, name: str) -> None:
        self.store.delete(f"{self.prefix}{name}.json")


class MemoryRecords:
    """Records in a dict (unit tests; a controller without persistence)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def load_all(self) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(d)) for d in self.data.values()]

    def save(self, name: str, data: dict[str, Any]) -> None:
        self.data[name] = json.loads(json.dumps(data))

    def delete(self, name: str) -> None:
        self.data.pop(name, None)
