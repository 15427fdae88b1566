"""The request contract: the original clients' payloads, defaults and refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.generation.samplers import supported_samplers
from serve_app.schemas import GenerateRequest

ORIGINAL_CLIENT = {
    "prompt": "a red cat",
    "nof_images": 4,
    "gpus": 2,
    "diversity": {
        "samplers": ["euler", "ddim", "dpmpp_2m"],
        "nof_steps": [10, 20, 30],
        "cfg_scales": [3.5, 5.0, 7.5],
        "seeds": "mix",
    },
    "stream": False,
    "top_k": None,
}


def error_of(payload: dict[str, object]) -> dict[str, object]:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate(payload)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return dict(errors[0])


def test_the_original_clients_payload_fails_only_on_its_unsupported_sampler() -> None:
    error = error_of(ORIGINAL_CLIENT)
    assert error["loc"] == ("diversity", "samplers", 1)
    assert "ddim" in str(error["msg"])
    for name in supported_samplers():
        assert name in str(error["msg"])


def test_the_original_clients_payload_with_supported_samplers_is_accepted() -> None:
    payload = {
        **ORIGINAL_CLIENT,
        "diversity": {**ORIGINAL_CLIENT["diversity"], "samplers": ["euler", "dpmpp_2m"]},
    }  # type: ignore[dict-item]
    parsed = GenerateRequest.model_validate(payload)
    assert parsed.top_k is None
    assert parsed.gpus == 2
    assert parsed.diversity.nof_steps == [10, 20, 30]


def test_explicit_nulls_mean_defaults() -> None:
    parsed = GenerateRequest.model_validate(
        {
            "prompt": "x",
            "nof_images": None,
            "diversity": None,
            "top_k": None,
            "stream": None,
            "gpus": None,
        }
    )
    assert (parsed.nof_images, parsed.gpus, parsed.stream, parsed.top_k) == (16, 1, False, None)
    nested = GenerateRequest.model_validate(
        {"prompt": "x", "diversity": {"samplers": None, "seeds": None}}
    )
    assert nested.diversity.samplers is None
    assert nested.diversity.seeds == "mix"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param({}, "prompt", id="missing-prompt"),
        pytest.param({"prompt": "   "}, "prompt", id="blank-prompt"),
        pytest.param({"prompt": None}, "prompt", id="null-prompt"),
        pytest.param({"prompt": "x", "colour": "red"}, "colour", id="unknown-field"),
        pytest.param(
            {"prompt": "x", "diversity": {"sampler": ["euler"]}},
            "diversity.sampler",
            id="unknown-nested",
        ),
        pytest.param({"prompt": "x", "nof_images": 0}, "nof_images", id="no-images"),
        pytest.param({"prompt": "x", "nof_images": 65}, "nof_images", id="too-many-images"),
        pytest.param(
            {"prompt": "x", "top_k": 5, "nof_images": 4}, "top_k", id="top-k-above-images"
        ),
        pytest.param({"prompt": "x", "width": 100}, "width", id="width-not-multiple-of-16"),
        pytest.param({"prompt": "x", "height": 16}, "height", id="height-below-minimum"),
        pytest.param({"prompt": "x", "gpus": 0}, "gpus", id="no-gpus"),
        pytest.param(
            {"prompt": "x", "diversity": {"seeds": "sometimes"}}, "diversity.seeds", id="seed-mode"
        ),
        pytest.param(
            {"prompt": "x", "diversity": {"nof_steps": []}}, "diversity.nof_steps", id="empty-list"
        ),
        pytest.param(
            {"prompt": "x", "diversity": {"cfg_scales": [0.5]}},
            "diversity.cfg_scales.0",
            id="cfg-below-1",
        ),
        pytest.param({"prompt": "x", "base_seed": -1}, "base_seed", id="negative-seed"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(payload: dict[str, object], param: str) -> None:
    error = error_of(payload)
    assert ".".join(str(part) for part in error["loc"]) == param  # type: ignore[attr-defined]


def test_top_k_refusal_names_both_numbers() -> None:
    error = error_of({"prompt": "x", "top_k": 5, "nof_images": 4})
    assert "top_k (5)" in str(error["msg"])
    assert "nof_images (4)" in str(error["msg"])


def test_openapi_schema_documents_every_field() -> None:
    from serve_app.schemas import Diversity

    for model in (GenerateRequest, Diversity):
        schema = model.model_json_schema()
        for name, field in schema["properties"].items():
            assert field.get("description"), f"{model.__name__}.{name} has no description"
    nof_images = GenerateRequest.model_json_schema()["properties"]["nof_images"]
    assert nof_images["anyOf"] == [
        {"type": "integer", "minimum": 1, "maximum": 64},
        {"type": "null"},
    ]


def test_an_unknown_field_is_refused_even_when_null() -> None:
    error = error_of({"prompt": "x", "colour": None})
    assert error["loc"] == ("colour",)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        pytest.param({"prompt": "x", "base_seed": False}, "base_seed", id="bool-for-int"),
        pytest.param({"prompt": "x", "nof_images": "4"}, "nof_images", id="string-for-int"),
        pytest.param({"prompt": "x", "stream": "true"}, "stream", id="string-for-bool"),
        pytest.param({"prompt": 5}, "prompt", id="number-for-string"),
    ],
)
def test_json_types_are_not_coerced(payload: dict[str, object], param: str) -> None:
    assert ".".join(str(part) for part in error_of(payload)["loc"]) == param  # type: ignore[attr-defined]


def test_floats_take_integers() -> None:
    parsed = GenerateRequest.model_validate({"prompt": "x", "diversity": {"cfg_scales": [2]}})
    assert parsed.diversity.cfg_scales == [2.0]


def test_integral_numbers_count_as_integers_as_in_json_schema() -> None:
    parsed = GenerateRequest.model_validate({"prompt": "x", "nof_images": 4.0, "gpus": 1.0})
    assert (parsed.nof_images, parsed.gpus) == (4, 1)
    assert error_of({"prompt": "x", "nof_images": 4.5})["loc"] == ("nof_images",)


def test_every_bound_is_in_the_json_schema() -> None:
    from serve_app.schemas import Diversity

    width = GenerateRequest.model_json_schema()["properties"]["width"]["anyOf"][0]
    assert {"minimum", "maximum", "multipleOf"} <= width.keys()
    steps = Diversity.model_json_schema()["properties"]["nof_steps"]["anyOf"][0]["items"]
    assert {"minimum", "maximum"} <= steps.keys()
