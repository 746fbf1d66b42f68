"""FID and KID on Inception-v3 from a weights file (offline), and their checks at validation.

The weights are random values in the layout of torch-fidelity's released file (the layout is
pinned key for key in tests/golden/inception_v3_state_dict.txt, written from torch-fidelity
0.4.0's `FeatureExtractorInceptionV3`). Inception on a CPU takes a second or two per image, so
the tests that run it are few, on a handful of images, and marked slow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, small_spec, write_spec
from PIL import Image

from contract.spec import EvalSpec, SpecError, load_spec
from evaluation.context import GeneratedImages, TrialContext
from evaluation.downloads import download_path
from evaluation.encoders import reference_embeddings
from evaluation.inception import InceptionFeatures, InceptionV3, load_inception
from evaluation.metric_fid import Fid
from evaluation.metric_kid import Kid
from evaluation.metrics import frechet_distance, kernel_inception_distance
from launch import cli

GOLDEN_LAYOUT = REPO / "tests" / "golden" / "inception_v3_state_dict.txt"
KEEPS_FEATURES = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
"""torchmetrics' KID warns that it keeps every feature: these tests hold a handful."""


def random_inception_state() -> dict[str, torch.Tensor]:
    """Random weights in the released layout, scaled (He) so that features differ by image;
    without batch-norm step counters, which torch fills in."""
    with torch.device("meta"):  # shapes only
        layout = InceptionV3().state_dict()
    generator = torch.Generator().manual_seed(0)

    def uniform(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    state = {}
    for key, value in layout.items():
        if key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2 / fan_in)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.2 * uniform(value.shape) - 0.1
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 1 + 0.1 * uniform(value.shape)
        elif key.startswith("fc."):
            state[key] = 0.01 * torch.randn(value.shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state(), path)
    return path


def noise_images(count: int, seed: int) -> list[Image.Image]:
    """299×299 (Inception's input, so no resize) images of differing brightness and noise."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(
            (rng.integers(0, 256, (299, 299, 3)) * rng.uniform(0.2, 1.0)).astype(np.uint8)
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fid-reference")
    for index, image in enumerate(noise_images(3, seed=1)):
        image.save(folder / f"{index}.png")  # lossless: read back, the same pixels
    return folder


def as_uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


# --- the network and its weights file (fast) --------------------------------------------------


def test_the_network_has_torch_fidelitys_state_dict_layout_key_for_key() -> None:
    golden = [
        line.split() for line in GOLDEN_LAYOUT.read_text().splitlines() if not line.startswith("#")
    ]
    with torch.device("meta"):
        layout = InceptionV3().state_dict()
    ours = [[key, "x".join(map(str, value.shape)) or "scalar"] for key, value in layout.items()]
    assert ours == golden


def test_a_weights_file_of_another_layout_is_refused_naming_the_file(
    weights: Path, tmp_path: Path
) -> None:
    model = load_inception(weights)  # a file without batch-norm step counters loads
    torch.testing.assert_close(model.fc.weight, torch.load(weights)["fc.weight"])
    assert int(model.Mixed_7c.branch_pool.bn.num_batches_tracked) == 0

    torch.save({"head.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as caught:
        load_inception(tmp_path / "other.pth")
    message = str(caught.value)
    assert f"eval.fid_weights: '{tmp_path / 'other.pth'}'" in message
    assert "Conv2d_1a_3x3.conv.weight" in message and "head.weight" in message

    torch.save({"fc.bias": torch.zeros(10)}, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match=r"size mismatch for fc\.bias"):
        load_inception(tmp_path / "reshaped.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_inception(tmp_path / "list.pth")


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 3, 64, 64), torch.uint8),
        ((2, 3, 299, 300), torch.uint8),
        ((1, 3, 299, 299), torch.float32),
    ],
)
def test_the_network_refuses_input_that_is_not_uint8_at_299(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # No resize inside: torch-fidelity's TF1 bilinear is not rebuilt, so any other size is an error.
    with torch.device("meta"):  # the check comes before any weight is used
        model = InceptionV3()
    with pytest.raises(ValueError) as caught:
        model(torch.zeros(shape, dtype=dtype, device="meta"))
    assert str(caught.value) == (
        "Inception takes uint8 images [N, 3, 299, 299] (resize them first, e.g. with "
        f"evaluation.inception.inception_input), got {dtype} {list(shape)}"
    )


# --- the distances on features (fast) ---------------------------------------------------------


@pytest.mark.parametrize(("rows", "dim"), [(40, 6), (5, 12), (9, 9)])
def test_frechet_distance_equals_torchmetrics_on_both_routes(rows: int, dim: int) -> None:
    # Fewer rows than dimensions (singular values) and not (symmetric eigenvalues), against
    # torchmetrics' general eigenvalues; the features go in as they are (an identity extractor).
    from torchmetrics.image.fid import FrechetInceptionDistance

    generator = torch.Generator().manual_seed(rows)
    a = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    b = 0.5 + 2 * torch.randn(rows + 3, dim, generator=generator, dtype=torch.float64)
    reference = FrechetInceptionDistance(feature=torch.nn.Identity(), input_img_size=(dim,))
    reference.update(b, real=True)
    reference.update(a, real=False)
    # 1e-6: torchmetrics takes square roots of Σ₁Σ₂'s rounding-level eigenvalues, of size √ε.
    assert frechet_distance(a, b) == pytest.approx(reference.compute().item(), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@KEEPS_FEATURES
@pytest.mark.parametrize(("subsets", "subset_size"), [(7, 5), (1, 12)])
def test_kid_draws_the_subsets_of_torchmetrics(subsets: int, subset_size: int) -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    generator = torch.Generator().manual_seed(3)
    real = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    fake = 2 + torch.randn(15, 16, generator=generator, dtype=torch.float64)
    reference = KernelInceptionDistance(
        feature=torch.nn.Identity(), subsets=subsets, subset_size=subset_size
    )
    reference.update(real, real=True)
    reference.update(fake, real=False)
    torch.manual_seed(11)
    expected = reference.compute()[0].item()
    ours = kernel_inception_distance(fake, real, subsets=subsets, subset_size=subset_size, seed=11)
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours > 0
    capped = kernel_inception_distance(fake, real, subsets=1, subset_size=1000, seed=0)
    assert capped == pytest.approx(
        kernel_inception_distance(fake, real, subsets=1, subset_size=12, seed=0), rel=1e-12
    )


# --- Inception features through the metrics (slow: Inception on a CPU) ------------------------


@pytest.mark.slow
@KEEPS_FEATURES
def test_kid_equals_torchmetrics_with_the_same_inception(
    weights: Path, reference_folder: Path
) -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    encoder = InceptionFeatures(str(weights))
    files = sorted(reference_folder.iterdir())
    real_images, fake_images = [Image.open(f) for f in files], noise_images(2, seed=2)
    real = reference_embeddings(encoder, files, normalize=False)
    fake = encoder.embed_images(fake_images)
    assert real.shape == (3, 2048) and fake.shape == (2, 2048)
    assert real.dtype == fake.dtype == torch.float32  # as ImageEncoder promises

    kid = KernelInceptionDistance(feature=encoder.model, subsets=4, subset_size=2)
    kid.update(as_uint8(real_images), real=True)
    kid.update(as_uint8(fake_images), real=False)
    torch.manual_seed(5)
    expected = kid.compute()[0].item()
    ours = kernel_inception_distance(fake, real, subsets=4, subset_size=2, seed=5)
    assert ours == pytest.approx(expected, rel=1e-5)  # torchmetrics keeps float32 features
    assert ours != 0


@pytest.mark.slow
def test_fid_and_kid_share_one_inception_and_fid_of_a_set_with_itself_is_zero(
    weights: Path, reference_folder: Path
) -> None:
    spec = EvalSpec(
        prompts=["a photo of {token} {class}"],
        images_per_prompt=2,
        metrics=["fid", "kid"],
        fid_reference=reference_folder,
        fid_weights=str(weights),
        kid_subsets=3,
        kid_subset_size=2,
    )
    trial = TrialContext(
        spec,
        class_token="toy",
        reference_files=[],
        jobs=[],
        variants=[""],
        device=torch.device("cpu"),
    )
    fid, kid = Fid(trial), Kid(trial)
    assert fid.features is kid.features  # one Inception, one pass over each evaluation
    assert Fid.needs(trial) == set()  # Inception is theirs: no shared CLIP or DINO loaded
    same = [Image.open(f) for f in sorted(reference_folder.iterdir())]
    generated = GeneratedImages(trial, [*same, *noise_images(1, seed=4)])
    itself = fid.curve(generated, [0, 1, 2], None)
    other = fid.curve(generated, [1, 2, 3], None)
    assert itself == pytest.approx(0.0, abs=1e-6 * other)
    assert other > 0
    assert kid.curve(generated, [1, 2, 3], None) == kernel_inception_distance(
        kid.features.of(generated, [1, 2, 3]),
        kid.features.reference,
        subsets=3,
        subset_size=2,
        seed=spec.seed,
    )


# --- validation -----------------------------------------------------------------------------


def fid_spec(tmp_path: Path, grid: dict | None = None, **evaluation: object) -> Path:
    reference = tmp_path / "reference"
    reference.mkdir(exist_ok=True)
    for index, image in enumerate(noise_images(2, seed=0)):
        image.resize((32, 32)).save(reference / f"{index}.png")
    eval_section = {"metrics": ["similarity", "fid", "kid"], "fid_reference": "reference"}
    spec = small_spec(tmp_path, eval={**eval_section, **evaluation}, grid=grid or {})
    return write_spec(tmp_path, spec)


def test_missing_weights_files_are_reported_with_every_other_problem(tmp_path: Path) -> None:
    path = fid_spec(
        tmp_path,
        metrics=["similarity", "aesthetics", "fid", "kid"],
        fid_weights="weights/inception.pth",
        aesthetics_head="heads/laion.pth",
        grid={"eval_every": 3},
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert "grid: eval_every (3) must divide max_steps (4)" in problems[0]
    assert (
        f"eval.fid_weights: no file at '{tmp_path / 'weights' / 'inception.pth'}'; the released "
        "file is https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth" in problems
    )
    assert any(
        p.startswith(f"eval.aesthetics_head: no file at '{tmp_path / 'heads' / 'laion.pth'}'")
        for p in problems
    )
    # Features other than Inception need no weights file.
    load_spec(fid_spec(tmp_path, fid_features="dino", fid_weights="weights/inception.pth"))


def test_weights_at_an_unreachable_url_fail_validation_unless_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/weights-inception-2015-12-05-6726825d.pth"
    path = fid_spec(tmp_path, fid_weights=url)
    assert cli.main(["validate", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"eval.fid_weights: {url} is not in the cache ({download_path(url)})" in error
    assert "cannot be downloaded from this machine" in error and "refused" in error

    # Once downloaded (here: put where a download would go), validation passes offline.
    download_path(url).parent.mkdir(parents=True)
    torch.save(random_inception_state(), download_path(url))
    assert cli.main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_validate_warns_when_fid_has_fewer_than_2048_images_per_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "inception.pth").write_bytes(b"checked at validation for existence only")
    path = fid_spec(tmp_path, fid_weights="inception.pth", images_per_prompt=3)
    assert cli.main(["validate", str(path)]) == 0
    warning = (
        "warning: eval.metrics: 'fid' on 3 images per step (eval.images_per_prompt 3 × 1 "
        "prompts); below 2,048 images (the width of Inception's features) FID is biased upwards "
        "and noisy"
    )
    assert warning in capsys.readouterr().err
    # On DINO embeddings the 2,048 is not their width: the warning says where it comes from.
    dino = fid_spec(tmp_path, fid_features="dino", images_per_prompt=3)
    assert cli.main(["validate", str(dino)]) == 0
    assert (
        "below 2,048 images (FID's usual minimum, from Inception's features; on DINO embeddings "
        "too, its bias falls only with more images) FID is biased upwards and noisy"
    ) in capsys.readouterr().err
    many = fid_spec(tmp_path, fid_weights="inception.pth", images_per_prompt=2048)
    assert cli.main(["validate", str(many)]) == 0
    assert "warning: eval.metrics: 'fid'" not in capsys.readouterr().err


def test_kid_like_fid_cannot_be_weighted_or_collapse(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    spec["eval"] |= {"metrics": ["similarity", "kid"], "fid_reference": "subjects/robot"}
    spec["selection"] = {
        "weights": {"similarity": 1.0, "kid": 1.0},
        "collapse": {"metrics": ["kid"]},
    }
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec))
    problems = caught.value.problems
    assert any(p.startswith("selection.weights: 'kid' cannot be weighted") for p in problems)
    assert "selection.collapse.metrics: 'kid' is lower-is-better; it cannot collapse" in problems
