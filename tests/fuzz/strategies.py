"""Hypothesis strategies shared by the fuzz tests: protobuf messages with hostile fields, header values."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from flotilla.api.v1 import inference_pb2

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)

header_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
"""Header values as servers hand them over: gRPC decodes metadata as UTF-8 (latin-1 when it is not),
the HTTP app as latin-1; neither yields a lone surrogate."""

uuid_like = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.text(max_size=60),
    st.text(string.hexdigits + "-/.", min_size=30, max_size=40),
)
"""Image uuids: canonical ones, upper-case ones, near misses and anything."""


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` cut short, with bytes flipped, or with garbage appended (or as it is)."""
    how = draw(st.sampled_from(["same", "cut", "flip", "append"]))
    if how == "cut" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=20))
    return raw


@st.composite
def classify_bodies(draw: st.DrawFn, models: list[str]) -> bytes:
    """A Classify request's bytes: garbage, or a request with any field values, perhaps mutated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    request = inference_pb2.ClassifyRequest(
        image_uuid=draw(uuid_like),
        model_name=draw(st.sampled_from([*models, "", "other"]) | st.text(max_size=20)),
        top_k=draw(UINT32),
        request_id=draw(st.text(max_size=20)),
        priority=draw(st.sampled_from([0, 1, 2, 3]) | UINT32),
        timeout_us=draw(st.sampled_from([0, 1000]) | UINT64),
        model_version=draw(st.sampled_from([0, 1, 2]) | UINT32),
        all_scores=draw(st.booleans()),
    )
    return draw(mutated(request.SerializeToString()))
