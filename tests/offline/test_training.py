"""Training stages on tiny images: each stage runs, the whole run resumes, bad input is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lineguard.engines.bundle import load_bundle
from lineguard.engines.errors import LineguardError
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.offline.banks import PATCH_BANK_CAP, bank_cap, coreset_size, greedy_coreset
from lineguard.offline.evaluate import compute_metrics, evaluate_bundle
from lineguard.offline.lgst_train import (
    TEACHER_CACHE_BYTES,
    LGSTTrainConfig,
    fit_teacher_normalisation,
    hard_mse,
    train_lgst,
)
from lineguard.offline.pseudo_labels import PseudoLabelConfig
from lineguard.offline.seg_train import SegTrainConfig, dice_loss, histogram_loss, lsa
from lineguard.offline.synth import make_line
from lineguard.offline.train import TrainPreset, WorkDirMismatchError, train_bundle

TINY_PRESET = TrainPreset(
    seg=SegTrainConfig(steps=4, batch_labelled=2, batch_unlabelled=2),
    lgst=LGSTTrainConfig(steps=4, batch_size=2),
    pseudo=PseudoLabelConfig(clusters=8, feature_size=64, max_classes=4),
    patch_bank=64,
    hist_bank=True,
    comp_bank=True,
    fewshot_shots=2,
)
ALL_BRANCHES = ("patch_hist", "lgst", "patch_knn", "hist_knn", "comp_knn", "fewshot_knn")


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("line") / "tray"
    make_line(
        root,
        seed=1,
        n_train=10,
        n_val=6,
        n_test_good=4,
        n_test_logical=6,
        n_test_structural=3,
        size=64,
    )
    return root


@pytest.fixture(scope="module")
def trained(line: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tray"
    train_bundle(line, out, preset=TINY_PRESET, input_size=64, progress=False, log=lambda _m: None)
    return out


def test_training_writes_a_verified_calibrated_bundle(trained: Path) -> None:
    bundle = load_bundle(trained)
    assert bundle.branches == ALL_BRANCHES
    assert bundle.config.hist_bank == bundle.config.comp_bank == 10  # every training image
    assert bundle.config.num_classes >= 2
    assert np.isfinite(bundle.calibration.threshold)
    assert bundle.manifest["extra"]["n_validation"] == 6
    model = bundle.build_model()
    assert float(model.patch_knn.bank_sq.sum()) > 0  # the banks were filled
    assert float(model.hist_knn.bank_sq.sum()) > 0 and float(model.comp_knn.bank_sq.sum()) > 0
    assert float(model.fewshot_knn.bank.norm(dim=1).min()) == pytest.approx(1.0, abs=1e-4)
    assert float(model.lgst.teacher.std.min()) > 0  # teacher normalisation was fitted
    assert bundle.config.position_prior and bundle.config.position_scale  # the defaults
    assert bundle.config.patch_descriptor == "shallow"  # components found: an assembly
    assert float(model.prior_scale_lgst.std()) > 0  # the spread was fitted
    state = json.loads((trained.with_name("tray.work") / "state.json").read_text())
    assert state["done"] == ["pseudo_labels", "segmentation", "lgst", "banks", "calibration"]


def test_interrupted_training_resumes_after_the_last_finished_stage(
    line: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    seen: list[str] = []

    def stop_at_lgst(msg: str) -> None:
        seen.append(msg)
        if msg.startswith("stage 3/5"):
            raise KeyboardInterrupt  # what Ctrl-C or a kill between stages leaves behind

    with pytest.raises(KeyboardInterrupt):
        train_bundle(line, out, preset=TINY_PRESET, input_size=64, progress=False, log=stop_at_lgst)
    assert not out.exists()
    seen.clear()
    train_bundle(line, out, preset=TINY_PRESET, input_size=64, progress=False, log=seen.append)
    stages = [m for m in seen if m.startswith("stage")]
    assert stages[0].startswith("stage 3/5"), stages  # pseudo-labels and segmentation were reused
    load_bundle(out)
    seen.clear()
    again = train_bundle(
        line, out, preset=TINY_PRESET, input_size=64, progress=False, log=seen.append
    )
    assert again.version == load_bundle(out).version and "up to date" in seen[-1]
    other = TrainPreset(
        seg=SegTrainConfig(steps=5), lgst=TINY_PRESET.lgst, pseudo=TINY_PRESET.pseudo, patch_bank=64
    )
    with pytest.raises(WorkDirMismatchError, match="--restart"):
        train_bundle(line, out, preset=other, input_size=64, progress=False, log=seen.append)


def test_training_refuses_bad_datasets(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LineguardError, match=r"empty|no image"):
        train_bundle(empty, tmp_path / "out", preset=TINY_PRESET, progress=False)
    with pytest.raises(LineguardError, match=r"does not exist|not found|No such"):
        train_bundle(tmp_path / "missing", tmp_path / "out", preset=TINY_PRESET, progress=False)
    with pytest.raises(LineguardError, match="unknown preset"):
        train_bundle(empty, tmp_path / "out", preset="fastest", progress=False)


def test_bad_training_data_is_found_before_stage_1(line: Path, tmp_path: Path) -> None:
    """A corrupt validation image used to surface at stage 5, after all the training."""
    data = tmp_path / "data"
    shutil.copytree(line, data)
    victim = sorted((data / "validation" / "good").iterdir())[2]
    victim.write_bytes(b"not an image")
    seen: list[str] = []
    with pytest.raises(LineguardError, match=rf"{victim.name}.*corrupt"):
        train_bundle(data, tmp_path / "b", preset=TINY_PRESET, input_size=64, log=seen.append)
    assert not any(m.startswith("stage") for m in seen), seen
    # too few images: refused with the number, or warned about
    few = tmp_path / "few"
    (few / "train" / "good").mkdir(parents=True)
    first = sorted((line / "train" / "good").iterdir())[0]
    shutil.copy(first, few / "train" / "good" / first.name)
    with pytest.raises(LineguardError, match="at least 2"):
        train_bundle(few, tmp_path / "c", preset=TINY_PRESET, input_size=64, log=seen.append)


def test_fixing_a_validation_image_recalibrates_without_retraining(
    line: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(line, data)
    out = tmp_path / "b"
    seen: list[str] = []
    train_bundle(data, out, preset=TINY_PRESET, input_size=64, progress=False, log=seen.append)
    assert any("warning: only 10 training images" in m for m in seen)
    first = load_bundle(out)
    victim = sorted((data / "validation" / "good").iterdir())[0]
    other = sorted((data / "validation" / "good").iterdir())[1]
    shutil.copy(other, victim)  # a replaced file: new content, new mtime
    os.utime(victim, (victim.stat().st_atime, victim.stat().st_mtime + 5))
    seen.clear()
    again = train_bundle(
        data, out, preset=TINY_PRESET, input_size=64, progress=False, log=seen.append
    )
    stages = [m for m in seen if m.startswith("stage")]
    assert stages == ["stage 5/5: calibration on validation goods"], seen
    assert any("calibrating again" in m for m in seen)
    assert again.version != first.version  # a new calibration, the same networks
    # a changed training image still voids the run (it changes what the stages learnt)
    train_file = sorted((data / "train" / "good").iterdir())[0]
    os.utime(train_file, (train_file.stat().st_atime, train_file.stat().st_mtime + 5))
    with pytest.raises(WorkDirMismatchError):
        train_bundle(data, out, preset=TINY_PRESET, input_size=64, progress=False)


def test_evaluation_reports_metrics_and_pictures(trained: Path, line: Path, tmp_path: Path) -> None:
    result = evaluate_bundle(trained, line, out_dir=tmp_path / "eval")
    m = result.metrics
    assert m["n_images"] == 13 and m["n_good"] == 4
    assert set(m["by_type"]) == {"logical", "structural"}
    assert set(m["overall"]["branches"]) == set(ALL_BRANCHES)
    for name in ("report.html", "metrics.json", "misses.png", "false_alarms.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "data:image/png;base64" in (tmp_path / "eval" / "report.html").read_text()


def test_evaluation_needs_a_test_split(trained: Path, line: Path, tmp_path: Path) -> None:
    goods = tmp_path / "goods"
    shutil.copytree(line / "train" / "good", goods)
    with pytest.raises(LineguardError, match="no test split"):
        evaluate_bundle(trained, goods)


def test_metrics_from_known_scores() -> None:
    from lineguard.offline.datasets import Sample

    def s(label: int, kind: str) -> Sample:
        return Sample(Path(f"{kind}{label}.png"), label, kind, kind if label else None, ())

    samples = [s(0, "good"), s(0, "good"), s(1, "logical"), s(1, "structural")]
    fused = np.array([0.0, 1.0, 3.0, 0.5])
    raw = np.stack([fused, -fused], axis=1)
    m = compute_metrics(samples, raw, fused, ("a", "b"), threshold=2.0)
    assert m["by_type"]["logical"]["auroc"] == 1.0
    assert m["by_type"]["structural"]["auroc"] == 0.5
    assert m["by_type"]["logical"]["branches"]["b"] == 0.0
    assert m["false_reject_rate"] == 0.0
    assert m["overall"]["escape_rate"] == 0.5


def test_greedy_coreset_covers_every_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + rng.normal(0, 0.1, (200, 2)) for c in centres])
    chosen = greedy_coreset(torch.from_numpy(points).float(), 3)
    assert len(set(chosen.tolist())) == 3
    assert {int(i) // 200 for i in chosen} == {0, 1, 2}


def _naive_k_center(x: torch.Tensor, first: int, size: int) -> list[int]:
    """Textbook greedy k-center: every distance, every step."""
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(dim=1)
    for _ in range(size - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(dim=1))
    return chosen


def test_greedy_coreset_is_the_textbook_greedy() -> None:
    torch.manual_seed(0)
    centres = torch.randn(30, 16) * 4
    x = centres[torch.randint(30, (3000,))] + 0.5 * torch.randn(3000, 16)
    chosen = greedy_coreset(x, 200, projection_dim=16).tolist()
    naive = _naive_k_center(x, chosen[0], 200)
    # the same picks up to float near-ties (‖x‖² − 2x·p + ‖p‖² against (x − p)²; the 156th
    # here is a tie to 1e-5), and the same covering radius after every pick
    assert chosen[:150] == naive[:150]
    np.testing.assert_allclose(_radii(x, chosen), _radii(x, naive), rtol=1e-3)


def test_two_stage_coreset_keeps_a_rare_patch_and_covers_every_image() -> None:
    from lineguard.offline.banks import bank_coreset, local_coreset

    torch.manual_seed(0)
    centres = torch.randn(4, 8) * 3
    patches = centres[torch.randint(4, (20, 64))] + 0.2 * torch.randn(20, 64, 8)
    patches[7, 40] = 50.0  # one patch of one image unlike anything else
    local = local_coreset(patches, 3)
    assert local.shape == (60,) and 7 * 64 + 40 in local.tolist()
    assert torch.equal(local.view(20, 3) // 64, torch.arange(20).view(20, 1).expand(20, 3))
    owners = torch.arange(20).repeat_interleave(64)
    chosen = bank_coreset(patches.reshape(-1, 8), owners, 8, projection_dim=8)
    assert len(set(chosen.tolist())) == 8 and 7 * 64 + 40 in chosen.tolist()
    # one entry per cluster at least: every patch lies near the bank
    d = torch.cdist(patches.reshape(-1, 8), patches.reshape(-1, 8)[chosen]).amin(dim=1)
    assert float(d.max()) < 2.0


def _radii(x: torch.Tensor, chosen: list[int]) -> np.ndarray:
    """Largest distance from any point to the first k picks, for every k."""
    d = torch.cdist(x, x[chosen])
    return np.array([float(d[:, : k + 1].amin(dim=1).max()) for k in range(len(chosen))])


def test_coreset_size_is_a_share_of_the_patches_with_a_cap() -> None:
    assert coreset_size(533 * 1024) == PATCH_BANK_CAP  # the tiles: 10 % would be 54 580
    assert coreset_size(100 * 1024) == 10_240  # below the cap: PatchCore's 10 %
    assert coreset_size(1000, fraction=0.1) == 256  # a handful of images keeps a usable bank
    assert coreset_size(100) == 100  # never more entries than patches
    assert coreset_size(10**6, fraction=0.01, cap=50_000) == 10_000
    with pytest.raises(ValueError, match="fraction"):
        coreset_size(1000, fraction=0.0)
    mid = ModelConfig(patch_bank=8)  # lite0, 256 px: 1024 patches of 152-d
    assert bank_cap(mid) == PATCH_BANK_CAP
    # four times the patches at 64-d: the same search time buys fewer entries
    assert bank_cap(ModelConfig(patch_bank=8, patch_descriptor="shallow")) == 9728
    assert bank_cap(mid, cap=1000) == 1000


def test_losses_and_lsa() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:4, 2:4] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    assert histogram_loss(perfect, torch.tensor([[60 / 64, 4 / 64]])).item() == pytest.approx(0.0)
    labels = np.zeros((32, 32), np.uint8)
    labels[4:8, 4:8] = 1
    image = np.zeros((32, 32, 3), np.uint8)
    image[labels == 1] = 200
    moved_img, moved = lsa(image, labels, np.random.default_rng(0), max_copies=1)
    assert (moved == 1).sum() >= 16 and (moved_img[moved == 1] == 200).all()
    output = torch.arange(1000.0, requires_grad=True)
    target = 2 * output.detach()  # errors 0, 1, …, 999: the top 1 % are 989…999
    loss = hard_mse(target, output, 0.99)
    assert loss.item() == pytest.approx((torch.arange(989.0, 1000.0) ** 2).mean().item())
    loss.backward()
    assert (
        output.grad is not None and (output.grad[:989] == 0).all() and (output.grad[989:] < 0).all()
    )


def test_model_with_patch_bank_exports_and_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    from lineguard.engines.export import export_onnx

    config = ModelConfig(input_size=64, class_names=("bg", "a", "b"), patch_bank=32)
    model = CSADModel(config, backbone_weights=None).eval()
    model.patch_knn.set_bank(torch.randn(32, model.patch_knn.bank.shape[1]))
    export_onnx(model, tmp_path / "m.onnx")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["scores"], {"images": images})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(images)).scores.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_plain_surface_without_components_still_trains(tmp_path: Path) -> None:
    """Tiles, sheets, fabric: no components to count, so the histogram branch is constant."""
    import cv2

    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        cv2.imwrite(
            str(folder / f"{i:03d}.png"), (120 + rng.normal(0, 3, (64, 64))).astype(np.uint8)
        )
    messages: list[str] = []
    bundle = train_bundle(
        folder,
        tmp_path / "b",
        preset=TINY_PRESET,
        input_size=64,
        progress=False,
        log=messages.append,
    )
    assert bundle.config.class_names == ("background", "foreground")
    assert any("Patch Histogram branch will be inert" in m for m in messages)
    # a surface: the verdict is the patch bank's (PatchCore's recipe), the rest is shown only
    assert bundle.calibration.recipe == "surface"
    assert bundle.calibration.active == ("patch_knn",)
    assert any("fusion recipe surface: fuses patch_knn" in m for m in messages)
    # ... so the student is left out of the model: no training, no forward pass, zeros
    assert bundle.config.student is False and bundle.build_model().lgst is None
    # and the bank's map is divided by good parts' spread per position, a surface's default
    assert bundle.config.position_scale_knn
    spread = bundle.build_model().prior_scale_knn
    assert float(spread.min()) >= 0.25 and float(spread.std()) > 0
    assert any("LGST skipped" in m for m in messages)
    assert bundle.calibration.left_out()["lgst"]
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        out = bundle.build_model()(torch.from_numpy(images))
    assert int(out.segmentation.max()) == 0  # every pixel background: a constant histogram
    assert not out.scores[:, bundle.branches.index("lgst")].any()
    assert out.scores[:, bundle.branches.index("patch_knn")].std() > 0
    # the graph without the student exports, keeps its dynamic batch, and scores as torch does
    import onnxruntime as ort

    from lineguard.engines.export import export_onnx

    export_onnx(bundle.build_model().eval(), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for n in (1, 3):
        got = session.run(["scores", "anomaly_map"], {"images": images[:n]})
        np.testing.assert_allclose(got[0], out.scores[:n].numpy(), rtol=1e-4, atol=1e-4)
        assert got[1].shape == (n, 1, 16, 16)
    # bundle info says why the student's column is left out
    from typer.testing import CliRunner

    from lineguard.stream.cli import app

    shown = CliRunner().invoke(app, ["bundle", "info", str(bundle.path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "no student in this model" in shown.output and "mid descriptor" in shown.output
    # asked for, the student is trained on a surface too
    again = train_bundle(
        folder, tmp_path / "with", preset=TINY_PRESET, input_size=64, progress=False,
        student=True, log=lambda _m: None,
    )  # fmt: skip
    assert again.config.student is True and again.build_model().lgst is not None
    assert again.config.position_scale_knn  # the recipe, not the student, decides the spread


def test_refit_changes_banks_and_normalisation_without_touching_the_networks(
    trained: Path, line: Path, tmp_path: Path
) -> None:
    from lineguard.offline.banks import image_vectors
    from lineguard.offline.datasets import load_image, open_dataset
    from lineguard.offline.refit import refit_bundle

    source = load_bundle(trained)
    out = refit_bundle(
        trained,
        line,
        tmp_path / "refit",
        patch_bank=32,
        comp_bank=False,
        fewshot_shots=0,
        patch_search="faiss-ivf",
        position_prior=True,
        normalisation="loo_max",
        fusion="sum",
    )
    assert out.branches == ("patch_hist", "lgst", "patch_knn", "hist_knn")
    assert out.config.patch_search == "faiss-ivf"
    evaluation = evaluate_bundle(out.path, line, out_dir=tmp_path / "eval")  # faiss stage runs
    assert np.isfinite(evaluation.scores).all() and evaluation.scores[:, 2].std() > 0
    assert out.calibration.method == "loo_max" and out.calibration.combine == "sum"
    assert out.manifest["extra"]["refit_from"] == source.version
    assert load_bundle(trained).version == source.version  # the source is left as it was
    before, after = source.state_dict(), out.state_dict()
    for key, value in before.items():
        if key.startswith(("segmenter.", "lgst.student", "lgst.autoencoder", "backbone.")):
            assert torch.equal(value, after[key]), key
    # hist_knn is divided by PSAD's max leave-one-out distance over the training images
    model = out.build_model()
    codec = out.config.codec  # refit reads images as the bundle was trained: through it
    assert codec.spec == "jpeg:90"
    train = np.stack([load_image(s.path, 64, codec) for s in open_dataset(line).train])
    z = model.hist_knn.standardise(torch.from_numpy(image_vectors(model, train)["hist_knn"]))
    d = torch.cdist(z, z).fill_diagonal_(float("inf")).amin(dim=1)
    k = out.branches.index("hist_knn")
    assert out.calibration.mu[k] == 0.0
    assert out.calibration.sigma[k] == pytest.approx(float(d.max()), rel=1e-4)
    with pytest.raises(LineguardError, match="other than the source"):
        refit_bundle(trained, line, trained)
    # switching the prior off takes the spread (which divides what the prior left) with it
    off = refit_bundle(trained, line, tmp_path / "off", position_prior=False)
    assert not off.config.position_prior and not off.config.position_scale


def test_refit_to_other_histogram_grids_keeps_the_networks(
    trained: Path, line: Path, tmp_path: Path
) -> None:
    from lineguard.offline.refit import refit_bundle

    source = load_bundle(trained)
    out = refit_bundle(trained, line, tmp_path / "grids", hist_grids=(1, 4))
    assert out.config.hist_grids == (1, 4)
    state = out.state_dict()
    assert "patch_hist.mean_g2" not in state
    assert state["patch_hist.mean_g4"].shape == ((out.config.num_classes - 1) * 16,)
    assert float(state["patch_hist.sigma_g4"]) > 0
    for key, value in source.state_dict().items():
        if key.startswith(("segmenter.", "lgst.student", "backbone.")):
            assert torch.equal(value, state[key]), key
    evaluation = evaluate_bundle(out.path, line, out_dir=tmp_path / "eval")
    assert np.isfinite(evaluation.scores).all()


def test_refit_to_patchcores_descriptor_scores_alike_on_every_path(
    trained: Path, line: Path, tmp_path: Path
) -> None:
    """An old bundle's bank refitted with the mid-level descriptor: the refit's own model, the
    ONNX graph, torch, the faiss stage and ``evaluate`` give every image one patch score."""
    from dataclasses import replace

    from lineguard.engines.bundle import save_bundle
    from lineguard.engines.runtimes import open_runtime
    from lineguard.offline.datasets import load_image, open_dataset
    from lineguard.offline.refit import refit_bundle

    source = load_bundle(trained)
    old = source.build_model()
    shallow = CSADModel(replace(source.config, patch_descriptor="shallow"), None)
    shallow.load_state_dict(
        {
            k: v
            for k, v in old.state_dict().items()
            if not k.startswith(("patch_knn", "comp_knn", "prior_knn"))
        },
        strict=False,
    )
    legacy = save_bundle(shallow.eval(), tmp_path / "legacy", source.calibration)
    assert legacy.config.patch_descriptor == "shallow"
    out = refit_bundle(legacy.path, line, tmp_path / "mid", patch_descriptor="mid")
    assert out.config.patch_descriptor == "mid"
    n_train = len(open_dataset(line).train)
    cap = bank_cap(out.config)
    assert out.config.patch_bank == coreset_size(n_train * out.config.patch_count, cap=cap)
    model = out.build_model()
    assert model.patch_knn is not None and model.patch_knn.bank.shape[1] == 152
    dataset = open_dataset(line)
    # through the bundle's frame codec, as evaluate (and the line) read the files
    images = np.stack([load_image(s.path, 64, out.config.codec) for s in dataset.test])
    k = out.branches.index("patch_knn")
    with torch.no_grad():
        want = model(torch.from_numpy(images)).scores[:, k].numpy()
    for kind in ("onnxruntime", "torch"):
        got = open_runtime(out, kind=kind, max_batch=4).run(images).scores[:, k]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    evaluated = evaluate_bundle(out.path, line, out_dir=tmp_path / "eval").scores[:, k]
    np.testing.assert_allclose(np.sort(evaluated), np.sort(want), rtol=1e-4, atol=1e-5)
    faiss = refit_bundle(out.path, line, tmp_path / "faiss", patch_search="faiss-flat")
    assert faiss.config.patch_bank == out.config.patch_bank  # the size is kept
    got = open_runtime(faiss, kind="onnxruntime").run(images).scores[:, k]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_loo_scaling_of_the_patch_bank_is_psads_formula() -> None:
    from lineguard.offline.calibrate import leave_one_out_max

    config = ModelConfig(input_size=64, class_names=("bg", "a"), patch_bank=8)
    model = CSADModel(config, backbone_weights=None)
    model.patch_knn.q_a.fill_(1.0)
    model.patch_knn.q_b.fill_(3.0)
    d = 4.0  # a raw nearest-neighbour distance; the graph publishes 0.1·(d − 1) / (3 − 1)
    published = np.array([[0.0, 0.0, 0.1 * (d - 1.0) / 2.0]])
    maxima, offsets = leave_one_out_max(model, published, {"patch_knn": [2.0, 5.0]})
    assert (published[0, 2] - offsets[2]) / maxima[2] == pytest.approx(d / 5.0)
    assert offsets[:2].tolist() == [0.0, 0.0]  # no bank: validation maximum, no offset


def test_fewshot_curve_from_k_good_images(line: Path) -> None:
    from lineguard.offline.fewshot import fewshot_curve

    result = fewshot_curve(line, (1, 2), input_size=64)
    assert [row["shots"] for row in result["curve"]] == [1, 2]
    for row in result["curve"]:
        assert 0.0 <= row["auroc"] <= 1.0 and set(row["by_type"]) == {"logical", "structural"}
    with pytest.raises(LineguardError, match="shots"):
        fewshot_curve(line, (0, 11), input_size=64)


def test_position_prior_removes_what_every_good_part_shows() -> None:
    from lineguard.offline.calibrate import fit_position_prior

    config = ModelConfig(input_size=64, class_names=("bg", "a"), patch_bank=16, position_prior=True)
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    model.patch_knn.set_bank(torch.randn(16, model.patch_knn.bank.shape[1]))
    goods = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x = model.preprocess(torch.from_numpy(goods))
        raw = model.lgst(x, model.backbone(x)).mean(dim=0)
        fit_position_prior(model, goods)
        assert model.prior_lgst.abs().sum() > 0
        adjusted = model(torch.from_numpy(goods)).anomaly_map.mean(dim=0)
    # on the good parts themselves the adjusted map averages out near zero, the raw one not
    assert float(adjusted.mean().abs()) < 0.1 * float(raw.mean().abs())


def test_position_scale_evens_out_how_much_good_parts_vary() -> None:
    from lineguard.offline.calibrate import fit_position_prior

    config = ModelConfig(
        input_size=64, class_names=("bg", "a"), position_prior=True, position_scale=True
    )
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    rng = np.random.default_rng(1)
    # good parts that agree on their right half and differ wildly on their left half
    goods = np.repeat(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), 16, axis=0)
    goods[:, :, :32] = rng.integers(0, 256, (16, 64, 32, 3), dtype=np.uint8)

    def left_over_right() -> float:
        with torch.no_grad():
            std = model(torch.from_numpy(goods)).anomaly_map.std(dim=0)[0]
        return float(std[:, :6].mean() / std[:, -6:].mean())

    before = left_over_right()
    fit_position_prior(model, goods)
    assert float(model.prior_scale_lgst.min()) >= 0.25
    assert float(model.prior_scale_lgst.median()) == pytest.approx(1.0, abs=0.05)
    # the restless half is divided down relative to the quiet one
    assert left_over_right() < 0.5 * before
    with pytest.raises(LineguardError, match="position_prior"):
        ModelConfig(position_scale=True)


def test_validation_scores_are_held_out_from_the_prior_they_are_calibrated_with() -> None:
    """Each validation image is scored against a prior and spread fitted on the other goods:
    exactly what the model gives that image after fitting on the others alone."""
    from lineguard.offline.calibrate import (
        fit_position_prior,
        held_out_prior_scores,
        raw_scores,
    )

    config = ModelConfig(
        input_size=64,
        class_names=("bg", "a"),
        patch_bank=16,
        position_prior=True,
        position_scale=True,
    )
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    model.patch_knn.set_bank(torch.randn(16, model.patch_knn.bank.shape[1]))
    goods = np.random.default_rng(3).integers(100, 140, (7, 64, 64, 3), dtype=np.uint8)
    for i, good in enumerate(goods):  # each good part has a bright mark where no other has one
        y, x = 4 + 8 * (i % 7), 4 + 7 * ((3 * i) % 8)
        good[y : y + 6, x : x + 6] = 255
    held = held_out_prior_scores(model, fit_position_prior(model, goods))
    in_sample = raw_scores(model, goods)
    lgst, knn = config.branches.index("lgst"), config.branches.index("patch_knn")
    for i in (0, 4):
        fit_position_prior(model, np.delete(goods, i, axis=0))
        alone = raw_scores(model, goods[i : i + 1])[0]
        assert held["lgst"][i] == pytest.approx(alone[lgst], rel=1e-4, abs=1e-5)
        assert held["patch_knn"][i] == pytest.approx(alone[knn], rel=1e-4, abs=1e-5)
    # scored against statistics it shaped itself, an image reads as more normal than it is
    assert held["lgst"].mean() > in_sample[:, lgst].mean()


def test_cached_teacher_targets_train_the_same_networks() -> None:
    """The cache only skips recomputing the frozen teacher: with and without it, the same seed
    must give the same student and autoencoder (jittered steps still compute theirs)."""
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    config = LGSTTrainConfig(steps=6, batch_size=2, jitter_probability=0.5)
    trained = []
    for cache_bytes in (TEACHER_CACHE_BYTES, 0):
        torch.manual_seed(0)  # the student's and autoencoder's initial weights
        model = CSADModel(ModelConfig(input_size=64), backbone_weights="imagenet").eval()
        targets = fit_teacher_normalisation(model, images, keep_bytes=cache_bytes)
        assert (targets is not None) == bool(cache_bytes)
        train_lgst(model, images, config, targets=targets)
        trained.append(model.lgst.state_dict())
    cached, recomputed = trained
    for name, value in cached.items():
        torch.testing.assert_close(value, recomputed[name], rtol=1e-4, atol=1e-5, msg=name)


def test_refit_learns_confirmed_goods_and_checks_confirmed_defects(
    trained: Path, line: Path, tmp_path: Path
) -> None:
    """Feedback from the line: goods the operators confirmed enter the banks (each then has
    a good image at distance 0 in the image banks), defects are scored by the new bundle."""
    import cv2

    from lineguard.offline.calibrate import raw_scores
    from lineguard.offline.datasets import load_image, open_dataset
    from lineguard.offline.refit import refit_bundle

    dataset = open_dataset(line)
    goods = [s for s in dataset.test if s.label == 0][:2]
    bads = [s for s in dataset.test if s.label != 0][:3]
    fed = []
    for i, s in enumerate(goods):  # a new lighting the training set never had
        img = np.clip(load_image(s.path, 64).astype(np.int16) + 60, 0, 255).astype(np.uint8)
        path = tmp_path / f"fed-{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        fed.append(path)
    plain = refit_bundle(trained, line, tmp_path / "plain")
    out = refit_bundle(
        trained, line, tmp_path / "fb", extra_good=fed, check_bad=[s.path for s in bads]
    )
    assert out.config.hist_bank == plain.config.hist_bank + 2 == 12
    assert out.manifest["extra"]["n_train"] == 12
    images = np.stack([load_image(p, 64) for p in fed])
    k = out.branches.index("hist_knn")
    before = raw_scores(plain.build_model(), images)[:, k]
    after = raw_scores(out.build_model(), images)[:, k]
    assert (after < 1e-3).all() and (before > after).all(), (before, after)
    bad_images = np.stack([load_image(s.path, 64) for s in bads])
    fused = out.calibration.fuse(raw_scores(out.build_model(), bad_images))
    feedback = out.manifest["extra"]["feedback"]
    assert feedback == {
        "good": 2,
        "defects": 3,
        "defects_rejected": int((fused > out.calibration.threshold).sum()),
    }


def test_refit_feedback_command_reads_the_marks_from_the_history(
    trained: Path, line: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from lineguard.offline.datasets import load_image, open_dataset
    from lineguard.stream.cli import app
    from lineguard.stream.history.archive import ImageArchive
    from lineguard.stream.history.rows import row_from_event
    from lineguard.stream.history.store import HistoryStore
    from lineguard.stream.protocol import Event, make_frame

    hdir = tmp_path / "history"
    store = HistoryStore(None, directory=hdir)
    archive = ImageArchive(hdir / "images", max_days=30, max_bytes=1 << 30)
    samples = open_dataset(line).test[:3]
    for seq, s in enumerate(samples):
        frame = make_frame("line1", "cam0", seq, load_image(s.path, 64), t_capture=1.0)
        ev = Event("line1", "cam0", seq, "fail", 2.0, 1.0, {}, "m", {}, "", 1.0, 1.0)
        store.insert([row_from_event(ev, image=archive.save_frame(frame))])
        store.mark(ev.key, "good" if seq < 2 else "defect")
    store.mark("line1/cam0/000000099", "defect")  # a missed defect: no picture
    store.close()
    runner = CliRunner()
    args = ["refit", str(trained), str(line), "--out", str(tmp_path / "new"), "--feedback"]
    result = runner.invoke(app, args, env={"LINEGUARD_HISTORY__DIR": str(hdir)})
    assert result.exit_code == 0, result.output
    assert "2 good, 1 defect" in result.output and "no saved picture" in result.output
    feedback = load_bundle(tmp_path / "new").manifest["extra"]["feedback"]
    assert feedback["good"] == 2 and feedback["defects"] == 1
    empty = tmp_path / "empty"
    result = runner.invoke(
        app,
        [*args[:-2], str(tmp_path / "x"), "--feedback"],
        env={"LINEGUARD_HISTORY__DIR": str(empty)},
    )
    assert result.exit_code == 1 and "no history in" in result.output
    HistoryStore(None, directory=empty).close()  # a history without marks
    HistoryStore(None, directory=empty).count()
    result = runner.invoke(
        app,
        [*args[:-2], str(tmp_path / "x"), "--feedback"],
        env={"LINEGUARD_HISTORY__DIR": str(empty)},
    )
    assert result.exit_code == 1 and "no marked frame" in result.output
