"""The worker follows the fleet watch: specs and ready copies per change, removed models cleared."""

from __future__ import annotations

from collections.abc import Sequence

from flotilla.api.v1 import controller_pb2
from flotilla.common.fleet import FleetState
from flotilla.config import BackendSettings, ModelSettings
from flotilla.services.preprocess.processor import BatchProcessor
from flotilla.services.preprocess.server import FleetFollower


class RecordingBackend:
    """The parts of TritonBackend the follower drives, recorded."""

    def __init__(self) -> None:
        self.copies: dict[str, list[str]] = {}
        self.set_copies_calls: list[str] = []
        self.removed: list[str] = []
        self.http: list[dict[str, str]] = []

    def set_copies(self, model: str, addresses: list[str], backend: BackendSettings) -> None:
        self.copies[model] = list(addresses)
        self.set_copies_calls.append(model)

    def remove(self, model: str) -> None:
        self.copies.pop(model, None)
        self.removed.append(model)

    def set_http_endpoints(self, http: dict[str, str]) -> None:
        self.http.append(dict(http))


def status(name: str, ready: Sequence[str] = (), **spec: object) -> controller_pb2.ModelStatus:
    return controller_pb2.ModelStatus(
        name=name,
        spec_json=ModelSettings.model_validate(spec).model_dump_json(),
        copies=[controller_pb2.Copy(replica=r, state="ready") for r in ready],
    )


class Worker:
    def __init__(self) -> None:
        self.backend = RecordingBackend()
        self.processor = BatchProcessor({}, None, None, None, max_object_bytes=1, max_image_pixels=1)  # type: ignore[arg-type]
        self.backend_to_model: dict[str, str] = {}
        self.follower = FleetFollower(self.processor, self.backend, self.backend_to_model)  # type: ignore[arg-type]
        self.state = FleetState()
        self.generation = 0

    async def send(
        self,
        models: Sequence[controller_pb2.ModelStatus] = (),
        removed: Sequence[str] = (),
        *,
        full: bool = False,
        replicas: Sequence[controller_pb2.Replica] = (),
    ) -> None:
        self.generation += 1
        message = controller_pb2.Fleet(generation=self.generation, delta=not full, models=models,
                                       removed_models=removed, replicas=replicas)
        await self.follower.apply(self.state, self.state.apply(message))


async def test_a_whole_fleet_sets_every_model_and_its_ready_copies() -> None:
    worker = Worker()
    replica = controller_pb2.Replica(address="t1:8001", http_address="t1:8000")
    await worker.send([status("a", ["t1:8001"]), status("b", backend_model="b-onnx")], full=True, replicas=[replica])
    assert sorted(worker.processor.models) == ["a", "b"]
    assert worker.backend.copies == {"a": ["t1:8001"], "b-onnx": []}
    assert worker.backend_to_model == {"a": "a", "b-onnx": "b"}
    assert worker.backend.http == [{"t1:8001": "t1:8000"}]


async def test_a_delta_touches_only_the_models_it_names() -> None:
    worker = Worker()
    await worker.send([status(f"m{i}", ["t1:8001"]) for i in range(100)], full=True)
    spec_of_m2 = worker.processor.models["m2"]
    worker.backend.set_copies_calls.clear()

    await worker.send([status("m1", ["t1:8001", "t2:8001"])])
    assert worker.backend.set_copies_calls == ["m1"]
    assert worker.backend.copies["m1"] == ["t1:8001", "t2:8001"]
    assert worker.processor.models["m2"] is spec_of_m2
    assert worker.backend.http == []  # no replica has an HTTP endpoint, then or now: never set


async def test_a_removed_model_loses_its_copies_and_names() -> None:
    worker = Worker()
    await worker.send([status("a", ["t1:8001"]), status("b", ["t1:8001"], backend_model="b-onnx")], full=True)
    await worker.send(removed=["b"])
    assert sorted(worker.processor.models) == ["a"]
    assert worker.backend.removed == ["b-onnx"] and "b-onnx" not in worker.backend.copies
    assert worker.backend_to_model == {"a": "a"}


async def test_a_whole_fleet_again_clears_the_models_it_lacks() -> None:
    worker = Worker()
    await worker.send([status("a", ["t1:8001"]), status("b", ["t1:8001"])], full=True)
    await worker.send([status("b", ["t2:8001"])], full=True)
    assert sorted(worker.processor.models) == ["b"]
    assert worker.backend.removed == ["a"]
    assert worker.backend.copies == {"b": ["t2:8001"]}


async def test_a_new_spec_replaces_the_model_and_a_new_backend_name_clears_the_old_one() -> None:
    worker = Worker()
    await worker.send([status("a", ["t1:8001"], labels=["cat", "dog"])], full=True)
    await worker.send([status("a", ["t1:8001"], labels=["cat", "dog", "fox"])])
    assert worker.processor.models["a"].labels == ["cat", "dog", "fox"]
    assert worker.backend.removed == []

    await worker.send([status("a", ["t1:8001"], backend_model="a-v2")])
    assert worker.backend.removed == ["a"]
    assert worker.backend.copies == {"a-v2": ["t1:8001"]}
    assert worker.backend_to_model == {"a-v2": "a"}
