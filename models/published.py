"""Published ImageNet figures, kept as data in one place (README table, evaluation report).

`PUBLISHED`: ILSVRC-2012 validation accuracy (%) of a single model on a single 224x224 centre crop, keyed
by our registry name (plus reference architectures we do not register). A paper that reports errors is
stored as 100 - error, with the error as printed in `note`. `ILSVRC_WINNERS`: the classification
winners' top-5 error (%) on the ILSVRC test set: ensembles and multi-crop, not comparable to the above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PUBLISHED", "ILSVRC_WINNERS", "Published", "Winner", "published_for"]

# The same figures are in the installed weights' metadata: `<Weights>.meta["_metrics"]`.
_TV_DOCS = "https://docs.pytorch.org/vision/stable/models.html"
_SENET = "Hu et al., Squeeze-and-Excitation Networks, CVPR 2018 / TPAMI, arXiv:1709.01507"


@dataclass(frozen=True)
class Published:
    top1: Optional[float]  # %, None where the source gives none
    top5: Optional[float]
    source: str
    note: str = ""


@dataclass(frozen=True)
class Winner:
    year: int
    team: str
    model: str
    top5_error: float  # %, ILSVRC classification test set
    source: str


PUBLISHED: dict[str, tuple[Published, ...]] = {
    "alexnet": (
        Published(56.522, 79.066, f"torchvision docs, AlexNet_Weights.IMAGENET1K_V1 ({_TV_DOCS})"),
    ),
    "googlenet": (
        Published(69.778, 89.530, f"torchvision docs, GoogLeNet_Weights.IMAGENET1K_V1 ({_TV_DOCS})"),
        Published(
            None, 89.93, "Szegedy et al., Going Deeper with Convolutions, arXiv:1409.4842, Table 3",
            "1 model, 1 crop: top-5 error 10.07%; top-1 not reported",
        ),
    ),
    "resnet50": (
        Published(76.130, 92.862, f"torchvision docs, ResNet50_Weights.IMAGENET1K_V1 ({_TV_DOCS})"),
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
ILSVRC_WINNERS: tuple[Winner, ...] = (
    Winner(2012, "SuperVision", "AlexNet", 15.3, _RESULTS.format(2012) + " (15.315%)"),
    Winner(2013, "Clarifai", "Clarifai (ZFNet-style)", 11.7, _RESULTS.format(2013) + " (11.743%)"),
    Winner(2014, "GoogLeNet", "GoogLeNet", 6.67, _RESULTS.format(2014) + " (6.656%); Szegedy et al. 2014, Table 2"),
    Winner(2015, "MSRA", "ResNet", 3.57, _RESULTS.format(2015) + " (3.567%); He et al. 2016, Table 5"),
    Winner(2016, "Trimps-Soushen", "ensemble (Inception/ResNet family)", 2.99, _RESULTS.format(2016) + " (2.991%)"),
    Winner(2017, "WMW", "SENet", 2.251, _RESULTS.format(2017) + "; Hu et al. 2018, abstract"),
)


def published_for(name: str) -> tuple[Published, ...]:
    """The published figures for `name` (empty when there are none)."""
    return PUBLISHED.get(name, ())
