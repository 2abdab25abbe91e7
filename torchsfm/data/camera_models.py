"""Camera model metadata: COLMAP ids, names and parameter layouts.

The numeric ids are COLMAP's `CameraModelId` values, so they go to and from COLMAP files
unchanged. The table is part of the data model (`Cameras.model_id` and the layout of
`Cameras.params` are defined by it), so it sits in `data`, below the projection code of each
model in `torchsfm.cameras.models`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    model_id: int
    name: str
    params: tuple[str, ...]
    focal: tuple[int, ...]  # indices of focal length(s) in params
    principal: tuple[int, ...]  # indices of cx, cy
    extra: tuple[int, ...]  # distortion parameter indices

    @property
    def num_params(self) -> int:
        return len(self.params)


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo(0, "SIMPLE_PINHOLE", ("f", "cx", "cy"), (0,), (1, 2), ()),
        ModelInfo(1, "PINHOLE", ("fx", "fy", "cx", "cy"), (0, 1), (2, 3), ()),
        ModelInfo(2, "SIMPLE_RADIAL", ("f", "cx", "cy", "k"), (0,), (1, 2), (3,)),
        ModelInfo(3, "RADIAL", ("f", "cx", "cy", "k1", "k2"), (0,), (1, 2), (3, 4)),
        ModelInfo(4, "OPENCV", ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"), (0, 1), (2, 3), (4, 5, 6, 7)),
        ModelInfo(5, "OPENCV_FISHEYE", ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4"), (0, 1), (2, 3), (4, 5, 6, 7)),
    )
}
MODELS_BY_ID: dict[int, ModelInfo] = {m.model_id: m for m in MODELS.values()}


def model_info(model: int | str) -> ModelInfo:
    try:
        return MODELS[model] if isinstance(model, str) else MODELS_BY_ID[int(model)]
    except KeyError:
        supported = ", ".join(MODELS)
        raise ValueError(f"unsupported camera model {model!r}; supported: {supported}") from None


def model_name(model_id: int) -> str:
    return model_info(model_id).name


def model_id(name: str) -> int:
    return model_info(name.upper()).model_id
