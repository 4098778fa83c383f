"""What every self-supervised objective shares: the OBJECTIVES registry, the Objective base class and
the MLP projector. src/ssl/objectives.py and src/ssl/clustering.py both build on it."""
from __future__ import annotations

from torch import nn

from src.config import SSLCfg
from src.registry import Registry

OBJECTIVES = Registry("objective")


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 2, last_bn: bool = False) -> nn.Sequential:
    """(Linear-BN-ReLU) x (layers-1), Linear, optional BN without affine (SimSiam's projector)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)



class Objective(nn.Module):
    """Base: `forward(feats, local_feats, views, encoder) -> scalar loss`."""

    needs_feats = True  # False: the objective encodes its own inputs (rotation)
    uses_local = False  # consumes multi-crop local views
    needs_rows = False  # True: forward also receives `rows`, the (B,) image rows of the batch (DeepCluster-v2)

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: SSLCfg) -> None:
        """Raise UserError for settings of this objective that types alone cannot check."""

    def on_epoch_start(self, epoch: int, encoder: nn.Module, images) -> None:
        """Called before every training epoch with all training images (uint8 (N, H, W, 3))."""

    def update_teacher(self, encoder: nn.Module, momentum: float) -> None:
        """Called after every optimiser step (EMA objectives)."""

    def teachers(self) -> list[nn.Module]:
        return []
