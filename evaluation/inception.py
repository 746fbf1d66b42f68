"""Inception-v3 pool3 features (2048-d) for `fid` and `kid`, from a weights file on disk.

The network is torch-fidelity's `FeatureExtractorInceptionV3`, the TensorFlow FID Inception
(`pt_inception-2015-12-05`) that torchmetrics' FID and KID run, rebuilt here on torch alone with
the same module names, so its released state dict (`weights-inception-2015-12-05-6726825d.pth`,
the file torchmetrics' `feature_extractor_weights_path` takes) loads unchanged and strictly.
Rebuilt rather than imported: importing any torch-fidelity module runs its package `__init__`,
which imports torchvision (for its CLIP, VGG and DINOv2 extractors), and torchvision's wheels do
not load beside this torch; with torch-fidelity installed and torchvision not, even
`import torchmetrics` fails.

Images are resized to 299×299 with PIL's bicubic first (as clean-fid does: reference folders mix
sizes). The network takes 299×299 only: torch-fidelity's resize of other sizes (TF1 bilinear) is
not rebuilt, so at 299×299, where its resize is the identity, the features equal torch-fidelity's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from contract.spec.evaluation import INCEPTION_WEIGHTS, is_url
from evaluation.downloads import cached_download
from evaluation.encoders import file_digest

INPUT_SIZE = 299
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = x
        for layer in (
            self.branch7x7x3_1,
            self.branch7x7x3_2,
            self.branch7x7x3_3,
            self.branch7x7x3_4,
        ):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(nn.Module):
    """The last two blocks; the TensorFlow graph max-pools in the second (`max_pool=True`)."""

    def __init__(self, in_channels: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
        )
        pooled = (
            F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            if self.max_pool
            else _tf_avg_pool(x)
        )
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """uint8 images `[N, 3, 299, 299]` → pool3 features `[N, 2048]` (float32).

    Module names are torch-fidelity's; `fc` (the 1008 logits) is unused by FID and KID but part
    of the state dict, so the released file loads strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # No resize here: torch-fidelity resizes with its own TF1-style bilinear, which torch's
        # interpolate does not reproduce, so any resize here would give other features than the
        # released network's. Callers resize first (`inception_input`: PIL bicubic, as clean-fid).
        expected = (3, INPUT_SIZE, INPUT_SIZE)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Inception takes uint8 images [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] (resize them "
                f"first, e.g. with evaluation.inception.inception_input), got {images.dtype} "
                f"{list(images.shape)}"
            )
        x = (images.float() - 128) / 128
        for name, block in self.named_children():  # in the order __init__ defines them
            if name == "fc":  # the logits: not a feature of FID or KID
                break
            x = block(x)
        return torch.flatten(x, 1)


def inception_weights_file(source: str) -> Path:
    """`eval.fid_weights` as a file: a local path, or a URL downloaded once to the cache."""
    if is_url(source):
        return cached_download(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.fid_weights: no file at {str(path)!r}; download torch-fidelity's Inception "
            f"weights ({INCEPTION_WEIGHTS}) and give their path"
        )
    return path


def load_inception(weights: Path, *, device: torch.device | str = "cpu") -> InceptionV3:
    """The network with `weights` (torch-fidelity's state-dict layout), in eval mode."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # no random init of 24M weights about to be replaced
        model = InceptionV3()
    problem = None
    if not isinstance(state, dict):
        problem = f"holds a {type(state).__name__}, not a state dict"
    else:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as err:  # a tensor of the wrong shape
            problem = str(err).splitlines()[-1].strip()
        else:
            # Batch-norm step counters are filled in by torch when a file has none.
            missing = [k for k in missing if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                problem = f"lacks keys {missing[:5]}, has unknown keys {unexpected[:5]}"
    if problem is not None:
        raise ValueError(
            f"eval.fid_weights: {str(weights)!r} is not torch-fidelity's Inception-v3 state "
            f"dict ({problem}); expected the file at {INCEPTION_WEIGHTS}"
        )
    return model.float().to(device).eval().requires_grad_(False)


class InceptionFeatures:
    """Inception-v3 pool3 features as an image encoder (`evaluation.encoders.ImageEncoder`)."""

    def __init__(self, source: str, *, device: torch.device | str = "cpu") -> None:
        weights = inception_weights_file(source)
        # The weights' digest keys the cached reference features: another file, other features.
        self.source = f"inception-v3:{file_digest(weights)}"
        self.device = torch.device(device)
        self.model = load_inception(weights, device=self.device)

    @torch.no_grad()
    def embed_images(
        self, images: list[Image.Image], *, normalize: bool = False, batch_size: int = 32
    ) -> torch.Tensor:
        """float32 `[N, 2048]` features on the CPU (FID and KID compute in float64)."""
        if normalize:
            raise ValueError("Inception features are only used un-normalised (FID, KID)")
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = np.stack(
                [np.asarray(inception_input(i)) for i in images[start : start + batch_size]]
            )
            pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)  # uint8 NCHW
            chunks.append(self.model(pixels).cpu())
        return torch.cat(chunks)


def inception_input(image: Image.Image) -> Image.Image:
    """An image as the network sees it: RGB, 299×299 by PIL's bicubic."""
    return image.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
