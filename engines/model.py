"""The fused CSAD model: a uint8 batch in, per-branch anomaly scores out, in one forward pass.

Everything a verdict depends on happens inside this module — resize, normalisation, backbone,
segmentation, histograms, Mahalanobis, LGST maps and their quantile normalisation — with tensor
operations only: no Python loop over the batch and no data-dependent control flow. That is what
gives the ONNX and TensorRT exports a real dynamic batch axis (the reference CSAD export is
effectively batch-1). Calibration statistics are buffers, so they are saved with the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from lineguard.engines.backbones import backbone_spec, create_backbone
from lineguard.engines.banks import FewShotBank, ImageBank, class_shares, composition
from lineguard.engines.codec import FrameCodec
from lineguard.engines.errors import ConfigError, InputError
from lineguard.engines.histogram import PatchHistogram
from lineguard.engines.input_size import InputSize, parse_input_size
from lineguard.engines.knn import (
    PATCH_DESCRIPTORS,
    PatchBank,
    descriptor_kind,
    patch_descriptors,
    to_map,
)
from lineguard.engines.lgst import LGST, PROFILES
from lineguard.engines.segmentation import SegmentationHead

CSAD_BRANCHES: tuple[str, ...] = ("patch_hist", "lgst")
PATCH_SEARCHES = ("graph", "faiss-flat", "faiss-ivf", "faiss-hnsw")
# Largest patch bank searched inside the graph when the search is left to lineguard ("auto"):
# up to here the matrix product keeps ONNX Runtime at ≥ 8 images/s at batch 8 on two cores and
# the bundle runs on every runtime, TensorRT included; a larger bank is searched with faiss
# HNSW after the engine (docs/patch_bank/README.md has the measurements).
GRAPH_SEARCH_MAX = 16_384
AUTO_SEARCH = "faiss-hnsw"


def resolve_patch_search(search: str, bank_size: int) -> str:
    """``auto`` → the in-graph search up to ``GRAPH_SEARCH_MAX`` entries, faiss above it; any
    other value is kept (``graph`` forces the in-graph search, e.g. for TensorRT)."""
    if search != "auto":
        return search
    return "graph" if bank_size <= GRAPH_SEARCH_MAX else AUTO_SEARCH


SEGMENTATION_WIDTH = {"paper": 256, "lite": 64}


class Outputs(NamedTuple):
    """What every runtime returns for a batch of B images; field names are the ONNX outputs.

    - ``scores`` ``[B, K]`` float32: raw score per branch, in ``ModelConfig.branches`` order;
    - ``anomaly_map`` ``[B, 1, h, w]`` float32: the normalised LGST map (plus the patch-bank map
      when that branch is on, resampled from its descriptor grid) at a quarter of the input
      size;
    - ``segmentation`` ``[B, H, W]`` uint8: component class per pixel (0 = background);
    - ``patch_features`` ``[B, g·g, D]`` float32 (``g`` = ``ModelConfig.patch_grid``), only
      from a graph whose patch bank is searched outside it (``patch_search`` ≠ ``graph``): the
      descriptors the faiss stage looks up, after which it fills the ``patch_knn`` column and
      map. ``None`` everywhere else.

    ``CSADModel.forward`` returns tensors; every runtime returns numpy arrays.
    """

    scores: Any
    anomaly_map: Any
    segmentation: Any
    patch_features: Any = None

    def map(self, fn: Any) -> Outputs:
        """Apply ``fn`` to every field that is present."""
        return Outputs(*(None if v is None else fn(v) for v in self))


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the architecture; stored in the bundle manifest."""

    backbone: str = "efficientnet_lite0"
    # (height, width); an int (or a manifest written before non-square inputs) means a square
    input_size: InputSize = (256, 256)
    profile: str = "lite"
    class_names: tuple[str, ...] = ("background", "component")
    # Patch Histogram grids. CSAD's 1 + 2 cannot tell where inside a half of the image a part
    # lies; chosen with docs/families/oracle_grids.py on the five synthetic families'
    # selection seeds (ground-truth maps, no report seed): mean logical AUROC 0.813 with 1,2
    # and 0.831 with 1,2,4 (tray swaps 0.92 -> 1.00, bottle label shifts 0.61 -> 0.90).
    hist_grids: tuple[int, ...] = (1, 2, 4)
    seed: int = 0
    patch_bank: int = 0  # size of the patch memory bank; 0 leaves the branch out
    hist_bank: int = 0  # good images in the class-histogram bank (PSAD); 0 leaves it out
    comp_bank: int = 0  # good images in the composition-embedding bank (PSAD); 0 leaves it out
    fewshot_shots: int = 0  # good images behind the training-free few-shot branch; 0: none
    patch_search: str = "graph"  # patch bank search: in the graph, or faiss-flat|ivf|hnsw after it
    # Patch descriptor of the patch and composition banks (engines.knn): "mid" is PatchCore's
    # (strides 8 + 16), "shallow" the stride 4 + 8 taps; a manifest written before the field
    # existed reads as "shallow", the only descriptor then, so those bundles score as before.
    patch_descriptor: str = "mid"
    position_prior: bool = False  # subtract good parts' mean map per position before the max
    position_scale: bool = False  # and divide the LGST map by their spread there (needs prior)
    # ... and the patch bank's map too. On a surface every position is the same texture, and
    # what varies among good parts at a position (a tile's edge or chamfer under pose jitter)
    # would otherwise set the image maximum; on an assembly the bank's distances already span
    # that variation (train decides by the fusion recipe; see TrainPreset).
    position_scale_knn: bool = False
    # The frame round trip that training, the banks and calibration saw ("raw", "png",
    # "jpeg:Q"); the line sends frames this way by default. Bundles from before it: lossless.
    frame_codec: str = "raw"
    # Whether the LGST student–teacher branch exists. A surface's verdict is its patch bank's
    # alone (engines.fusion, recipe "surface"), so training chooses to leave the student out
    # there: most of the training time and a third of the forward pass saved for a branch the
    # verdict ignores. Without it the ``lgst`` column and map are zeros (inert in the fusion),
    # so every runtime and consumer keeps the same outputs.
    student: bool = True

    @staticmethod
    def position_scale_for(prior: bool, asked: bool | None, default: bool) -> bool:
        """The spread setting when a user sets the prior: one not asked for follows the prior,
        since it divides what the prior leaves."""
        return (default and prior) if asked is None else asked

    def __post_init__(self) -> None:
        backbone_spec(self.backbone)  # raises with the list of known names
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; use one of {sorted(PROFILES)}")
        object.__setattr__(self, "input_size", parse_input_size(self.input_size))
        if len(self.class_names) < 2:
            raise ConfigError("class_names needs background plus at least one component class")
        h, w = self.input_size
        bad = [g for g in self.hist_grids if g < 1 or h % g or w % g]
        if bad or not self.hist_grids:
            raise ConfigError(
                f"histogram grids {self.hist_grids} must divide both sides of the input size "
                f"{h}x{w}"
            )
        for name in ("patch_bank", "hist_bank", "comp_bank", "fewshot_shots"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"{name} must be ≥ 0 (0 leaves the branch out), got {getattr(self, name)}"
                )
        if self.patch_search not in PATCH_SEARCHES:
            raise ConfigError(
                f"unknown patch_search {self.patch_search!r}; use one of {PATCH_SEARCHES}"
            )
        if self.patch_descriptor not in PATCH_DESCRIPTORS:
            raise ConfigError(
                f"unknown patch_descriptor {self.patch_descriptor!r}; use one of "
                f"{sorted(PATCH_DESCRIPTORS)}"
            )
        if (self.position_scale or self.position_scale_knn) and not self.position_prior:
            raise ConfigError(
                "position_scale divides the map after the prior: it needs position_prior"
            )
        if self.comp_bank and self.num_classes < 2:
            raise ConfigError("comp_bank needs at least one component class")
        FrameCodec.parse(self.frame_codec)  # raises on a bad spec

    @property
    def codec(self) -> FrameCodec:
        """The frame encoding this model was calibrated for (see ``lineguard.engines.codec``)."""
        return FrameCodec.parse(self.frame_codec)

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the columns of ``scores``, in order."""
        optional = {
            "patch_knn": self.patch_bank,
            "hist_knn": self.hist_bank,
            "comp_knn": self.comp_bank,
            "fewshot_knn": self.fewshot_shots,
        }
        return CSAD_BRANCHES + tuple(name for name, size in optional.items() if size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]

    @property
    def map_size(self) -> InputSize:
        """(h, w) of the anomaly map: a quarter of the input on each side."""
        return (self.height // 4, self.width // 4)

    @property
    def patch_grid(self) -> InputSize:
        """(rows, columns) of the patch banks' descriptor grid (32×32 for PatchCore's taps at
        256 px)."""
        stride = descriptor_kind(self.patch_descriptor).stride
        return (self.height // stride, self.width // stride)

    @property
    def patch_count(self) -> int:
        """Patches per image on the descriptor grid."""
        gh, gw = self.patch_grid
        return gh * gw

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"model config has unknown fields {unknown}: written by a newer lineguard?"
            )
        values = dict(data)
        values.setdefault("patch_descriptor", "shallow")  # written before the field existed
        if "input_size" in values:
            values["input_size"] = parse_input_size(values["input_size"])
        for key in ("class_names", "hist_grids"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class CSADModel(nn.Module):
    """Backbone → {segmentation → Patch Histogram, LGST, optional banks} → ``Outputs``."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    prior_lgst: torch.Tensor  # only with ModelConfig.position_prior
    prior_knn: torch.Tensor
    prior_scale_lgst: torch.Tensor  # only with ModelConfig.position_scale
    prior_scale_knn: torch.Tensor  # only with ModelConfig.position_scale_knn and a patch bank

    def __init__(self, config: ModelConfig, backbone_weights: str | Path | None = "imagenet"):
        super().__init__()
        self.config = config
        spec = backbone_spec(config.backbone)
        profile = PROFILES[config.profile]
        self.backbone = create_backbone(config.backbone, weights=backbone_weights)
        self.register_buffer("pixel_mean", 255.0 * torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", 255.0 * torch.tensor(spec.std).view(1, 3, 1, 1))
        self.segmenter = _segmentation_head(config, spec.channels)
        self.patch_hist = PatchHistogram(config.num_classes, config.input_size, config.hist_grids)
        self.lgst: LGST | None = (
            LGST(profile, spec.channels, config.input_size, config.seed) if config.student else None
        )
        self.patch_knn: PatchBank | None = None
        descriptor_dim = descriptor_kind(config.patch_descriptor).dim(spec.channels)
        if config.patch_bank:
            self.patch_knn = PatchBank(
                descriptor_dim, config.patch_bank, config.patch_grid, config.patch_descriptor
            )
        self.hist_knn = (
            ImageBank(config.num_classes, config.hist_bank) if config.hist_bank else None
        )
        self.comp_knn = (
            ImageBank((config.num_classes - 1) * descriptor_dim, config.comp_bank)
            if config.comp_bank
            else None
        )
        if config.position_prior:
            # What good parts' maps look like at each position (zero until calibration): zero
            # padding and fixed fixtures make some positions respond on every good part, and
            # without this their response, not the defect, sets the image maximum. The patch
            # bank's prior lives on its descriptor grid, where its score is taken.
            s, g = config.map_size, config.patch_grid
            self.register_buffer("prior_lgst", torch.zeros(1, 1, *s))
            self.register_buffer("prior_knn", torch.zeros(1, 1, *g))
        if config.position_scale:
            # Positions where good parts differ a lot among themselves (edges under pose jitter)
            # still set LGST's maximum after the mean is gone; their spread, relative to the
            # map's typical spread, divides them down (one until calibration). The patch bank's
            # map only with position_scale_knn: on an assembly its distances are to good patches
            # that already span that variation (on the seed-1 selection line dividing them too
            # cost structural AUROC, 0.951 → 0.945), on a surface it is what the spread is for.
            self.register_buffer("prior_scale_lgst", torch.ones(1, 1, *s))
        if config.position_scale_knn and config.patch_bank:
            self.register_buffer("prior_scale_knn", torch.ones(1, 1, *config.patch_grid))
        self.fewshot_knn = (
            FewShotBank(
                spec.channels[8] + spec.channels[16],
                config.fewshot_shots,
                (config.height // 8, config.width // 8),
            )
            if config.fewshot_shots
            else None
        )

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` RGB → normalised float ``[B, 3, S, S]``."""
        if images.dim() != 4 or images.shape[-1] != 3:
            raise InputError(f"expected images [B, H, W, 3], got shape {tuple(images.shape)}")
        # cast before any other op: TensorRT runs no layer but a cast on uint8
        x = images.to(self.pixel_mean.dtype).permute(0, 3, 1, 2)
        size = self.config.input_size
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.pixel_mean) / self.pixel_std

    def segment(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Class logits ``[B, C, S, S]`` from the backbone taps at strides 4, 8, 16."""
        return self.segmenter(features[0], features[2], self.config.input_size)

    def describe_patches(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The patch descriptors ``[B, D, g, g]`` that every patch-level bank reads.

        Training, refit, calibration, evaluation, the ONNX graph and the faiss stage all take
        them from here, so one image gets one descriptor, and one score, on every path.
        """
        return patch_descriptors(features, self.config.patch_descriptor)

    def forward(self, images: torch.Tensor) -> Outputs:
        x = self.preprocess(images)
        features = self.backbone(x)
        labels = self.segment(features).argmax(dim=1)
        if self.lgst is None:
            # [B, 1, H/4, W/4] zeros whose batch axis stays dynamic in the exported graph
            lgst_map = torch.zeros_like(x[:, :1, ::4, ::4])
        else:
            lgst_map = self.lgst(x, features)
            if self.config.position_prior:
                lgst_map = lgst_map - self.prior_lgst
            if self.config.position_scale:
                lgst_map = lgst_map / self.prior_scale_lgst
        columns = [self.patch_hist(labels), lgst_map.amax(dim=(1, 2, 3)).to(torch.float32)]
        amap = lgst_map.to(torch.float32)
        patch_features = None
        desc = None  # patch descriptors: computed once for every branch that reads them
        if self.patch_knn is not None or self.comp_knn is not None:
            desc = self.describe_patches(features)
        if self.patch_knn is not None and self.config.patch_search != "graph":
            # searched after the engine (runtimes.faiss_stage): hand the descriptors out and
            # leave the column at zero for that stage to fill
            assert desc is not None
            patch_features = desc.to(torch.float32).flatten(2).transpose(1, 2).contiguous()
            columns.append(torch.zeros_like(columns[1]))
        elif self.patch_knn is not None:
            assert desc is not None
            knn_map = self.patch_knn(desc)
            if self.config.position_prior:
                knn_map = knn_map - self.prior_knn
            if self.config.position_scale_knn:
                knn_map = knn_map / self.prior_scale_knn
            columns.append(knn_map.amax(dim=(1, 2, 3)))
            amap = amap + to_map(knn_map, self.config.map_size)
        if self.hist_knn is not None:
            columns.append(
                self.hist_knn(class_shares(labels, self.config.num_classes, self.config.input_size))
            )
        if self.comp_knn is not None:
            assert desc is not None
            cell = self.config.height // self.config.patch_grid[0]
            columns.append(self.comp_knn(composition(desc, labels, self.config.num_classes, cell)))
        if self.fewshot_knn is not None:
            columns.append(self.fewshot_knn(features[1], features[2]))
        # class ids → uint8 through float: TensorRT converts uint8 only to and from float/half
        seg = labels.to(torch.float32).to(torch.uint8)
        return Outputs(torch.stack(columns, dim=1), amap, seg, patch_features)


def _segmentation_head(config: ModelConfig, channels: dict[int, int]) -> SegmentationHead:
    width = SEGMENTATION_WIDTH[config.profile]
    return SegmentationHead(channels[4], channels[16], config.num_classes, width)
