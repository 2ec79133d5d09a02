"""Published ImageNet figures, kept as data in one place (README table, evaluation report).

`PUBLISHED`: ILSVRC-2012 validation accuracy (%) of a single model on a single centre crop (224x224 unless
`crop` says otherwise: EfficientNet-B1 and Xception are measured at their own resolution), keyed by our registry
name (plus reference architectures we do not register). A paper that reports errors is stored as 100 - error,
with the error as printed in `note`. `params` is the source's parameter count where it gives one (tests check
ours against it). `ILSVRC_WINNERS`: the classification
winners' top-5 error (%) on the ILSVRC test set: ensembles and multi-crop, not comparable to the above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PUBLISHED", "ILSVRC_WINNERS", "Published", "Winner", "published_for"]

# The same figures are in the installed weights' metadata: `<Weights>.meta["_metrics"]`.
_TV_DOCS = "https://docs.pytorch.org/vision/stable/models.html"
_SENET = "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018 / TPAMI, arXiv:1709.01507"
_RSB = "Wightman et al., ResNet strikes back: An improved training procedure in timm, arXiv:2110.00476"
_TV_RECIPE_V2 = "torchvision's new recipe, github.com/pytorch/vision/issues/3995"


@dataclass(frozen=True)
class Published:
    top1: Optional[float]  # %, None where the source gives none
    top5: Optional[float]
    source: str
    note: str = ""
    crop: int = 224  # the evaluation crop (px) the figures were measured at
    params: Optional[int] = None  # the source's parameter count, where it gives one


@dataclass(frozen=True)
class Winner:
    year: int
    team: str
    model: str
    top5_error: float  # %, ILSVRC classification test set
    source: str
    registered: Optional[str] = None  # our registry name of the winning architecture, where we build it


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "alexnet": (
        Published(56.522, 79.066, f"torchvision docs, AlexNet_Weights.IMAGENET1K_V1 ({_TV_DOCS})", params=61_100_840),
    ),
    "googlenet": (
        Published(69.778, 89.530, f"torchvision docs, GoogLeNet_Weights.IMAGENET1K_V1 ({_TV_DOCS})",
                  params=6_624_904),
        Published(
            None, 89.93, "Szegedy et al., Going Deeper with Convolutions, arXiv:1409.4842, Table 3",
            "1 model, 1 crop: top-5 error 10.07%; top-1 not reported",
        ),
    ),
    "resnet18": (
        Published(69.758, 89.078, f"torchvision docs, ResNet18_Weights.IMAGENET1K_V1 ({_TV_DOCS})", params=11_689_512),
        Published(71.5, None, _RSB, "A1 procedure (600 epochs), 224 px train and test; top-5 not reported"),
    ),
    "resnet34": (
        Published(73.314, 91.420, f"torchvision docs, ResNet34_Weights.IMAGENET1K_V1 ({_TV_DOCS})", params=21_797_672),
        Published(76.4, None, _RSB, "A1 procedure (600 epochs), 224 px train and test; top-5 not reported"),
    ),
    "resnet50": (
        Published(76.130, 92.862, f"torchvision docs, ResNet50_Weights.IMAGENET1K_V1 ({_TV_DOCS})", params=25_557_032),
    ),
    "regnety_016": (
        Published(80.876, 95.444, f"torchvision docs, RegNet_Y_1_6GF_Weights.IMAGENET1K_V2 ({_TV_DOCS})",
                  f"{_TV_RECIPE_V2}; resize 232, crop 224", params=11_202_430),
        Published(77.950, 93.966, f"torchvision docs, RegNet_Y_1_6GF_Weights.IMAGENET1K_V1 ({_TV_DOCS})",
                  "the paper's recipe, trained by torchvision"),
    ),
    "efficientnet_b1": (
        Published(79.838, 94.934, f"torchvision docs, EfficientNet_B1_Weights.IMAGENET1K_V2 ({_TV_DOCS})",
                  f"{_TV_RECIPE_V2}; resize 255, crop 240", crop=240, params=7_794_184),
        Published(79.1, 94.4, "Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs, ICML 2019, "
                  "arXiv:1905.11946, Table 2", "240 px", crop=240),
    ),
    "xception": (
        Published(79.0, 94.5, "Chollet, Xception: Deep Learning with Depthwise Separable Convolutions, CVPR 2017, "
                  "arXiv:1610.02357, Tables 1 and 3", "single model, single crop at 299 px; 22,855,952 parameters",
                  crop=299, params=22_855_952),
    ),
    "se_resnet50": (
        Published(76.71, 93.38, f"{_SENET}, Table 2", "top-1/top-5 error 23.29/6.62"),
    ),
    "senet154": (
        Published(
            81.32, 95.53, f"{_SENET}, Table 8 (224x224 single crop)",
            "top-1/top-5 error 18.68/4.47; same figures in github.com/hujie-frank/SENet README, Table 1",
        ),
    ),
    "se_googlenet": (
        Published(None, None, "—, ours", "no published figure: this project's own variant"),
    ),
    # Not registered; the nearest published relative of se_googlenet(se_placement="module")
    # (BN-Inception differs from GoogLeNet: 5x5 convs replaced by two 3x3, no aux heads at test).
    "se_bn_inception": (
        Published(75.77, 92.86, f"{_SENET}, Table 2", "SE-BN-Inception, top-1/top-5 error 24.23/7.14"),
    ),
}

_RESULTS = "https://image-net.org/challenges/LSVRC/{}/results"
_ILSVRC_PAPER = "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015, arXiv:1409.0575"
ILSVRC_WINNERS: tuple[Winner, ...] = (
    Winner(2010, "NEC-UIUC", "SIFT/LBP features, coding, linear SVMs", 28.2,
           _RESULTS.format(2010) + f" (0.28191); {_ILSVRC_PAPER}"),
    Winner(2011, "XRCE", "Fisher vectors, linear SVMs", 25.8, _RESULTS.format(2011) + f" (0.25770); {_ILSVRC_PAPER}"),
    Winner(2012, "SuperVision", "AlexNet", 15.3, _RESULTS.format(2012) + " (15.315%)", registered="alexnet"),
    Winner(2013, "Clarifai", "Clarifai (ZFNet-style)", 11.7, _RESULTS.format(2013) + " (11.743%)"),
    Winner(2014, "GoogLeNet", "GoogLeNet", 6.67, _RESULTS.format(2014) + " (6.656%); Szegedy et al. 2014, Table 2",
           registered="googlenet"),
    Winner(2015, "MSRA", "ResNet", 3.57, _RESULTS.format(2015) + " (3.567%); He et al. 2016, Table 5"),
    Winner(2016, "Trimps-Soushen", "ensemble (Inception/ResNet family)", 2.99, _RESULTS.format(2016) + " (2.991%)"),
    Winner(2017, "WMW", "SENet", 2.251, _RESULTS.format(2017) + "; Hu et al. 2018, abstract", registered="senet154"),
)


def published_for(name: str) -> tuple[Published, ...]:
    """The published figures for `name` (empty when there are none)."""
    return PUBLISHED.get(name, ())
