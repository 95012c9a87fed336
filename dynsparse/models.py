"""Small built-in models of the papers' own MNIST settings (``library: dynsparse`` in a recipe)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .errors import ConfigError
from .registry import Registry

__all__ = ["MODELS", "LeNet5", "LeNet300100", "create_model"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("built-in model")


@MODELS.register("lenet_300_100")
class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): ``in -> 300 -> 100 -> classes`` with ReLU.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        img_size: Input height = width.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_chans * img_size * img_size, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, num_classes)."""
        x = self.act(self.fc1(x.flatten(1)))
        return self.fc3(self.act(self.fc2(x)))


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 (Caffe variant: 20 and 50 5×5 filters, 500 hidden units), the sparse-VD paper's conv net.

    Args:
        num_classes: Output classes.
        in_chans: Input channels.
        img_size: Input height = width, at least 16 (`ConfigError` otherwise).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> None:
        side = ((img_size - 4) // 2 - 4) // 2
        if side < 1:  # the second conv or pool would find no pixels: a forward error, or an input-blind fc1
            raise ConfigError(
                f"built-in model 'lenet5': img_size must be at least 16 (two 5x5 convs, each followed by a 2x2 "
                f"pool), got {img_size}; resize the images (data.image_size) or use 'lenet_300_100'"
            )
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, num_classes)."""
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered built-in model."""
    return MODELS.get(name)(**kwargs)
