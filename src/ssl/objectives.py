"""Self-supervised objectives. Each owns its heads (and EMA teacher) and maps encoder features of
augmented views to a scalar loss; :class:`SSLModel` combines several with weights
(``cfg.ssl.objectives = {name: weight}``) and shares one encoder forward pass between them.

Shapes: B images per step (per process), V global views, L local crops, D = encoder.dim.
``feats``: list of V tensors (B, D); ``local_feats``: list of L tensors (B, D);
``views``: list of V normalised images (B, 3, S, S) (teachers and rotation re-encode them).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from src.config import SSLCfg
from src.ssl import clustering  # noqa: F401 - registers SwAV and DeepCluster-v2 in OBJECTIVES
from src.ssl.base import OBJECTIVES, Objective, mlp  # noqa: F401 - re-exported
from src.train_utils import all_gather_with_grad, all_reduce_mean, dist_info, ema_update


def frozen_copy(module: nn.Module) -> nn.Module:
    """EMA teacher: a copy with gradients off (its weights follow the student through ema_update)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def nt_xent(z: torch.Tensor, n_views: int, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, arXiv:2002.05709) over the global batch.

    z: (V*B, P) projections of this process, view-major (rows v*B..v*B+B-1 are view v). Under DDP
    the keys are gathered from every process with an autograd-aware all_gather, so negatives come
    from the whole global batch; each process scores its own anchors.

    Equals pytorch-metric-learning's NTXentLoss(temperature) with labels = image id (tested
    against it); written as one cross-entropy over a (V*B, W*V*B) similarity matrix because the
    library's pair-based form allocates (#positive pairs x #negative pairs) = O(B^3) floats (about
    4 GB at B=512) and synchronises the host through boolean indexing. For V > 2 every other view of
    the same image is a positive (one cross-entropy term per positive, as the library does)."""
    z = F.normalize(z.float(), dim=1)
    keys = all_gather_with_grad(z)  # (W*V*B, P)
    n, b = z.shape[0], z.shape[0] // n_views
    offset = dist_info().rank * n
    logits = z @ keys.T / temperature  # (V*B, W*V*B)
    rows = torch.arange(n, device=z.device)
    cols = torch.arange(keys.shape[0], device=z.device)
    same_image = [(offset + (rows + s * b) % n).unsqueeze(1) == cols for s in range(n_views)]  # s = 0: itself
    losses = []
    for shift in range(1, n_views):  # target: the same image in another view; masks instead of indexing
        hidden = same_image[0]  # an anchor is not its own negative ...
        for s in range(1, n_views):
            if s != shift:  # ... and the other positives are neither target nor negatives of this term
                hidden = hidden | same_image[s]
        target = offset + (rows + shift * b) % n
        losses.append(F.cross_entropy(logits.masked_fill(hidden, float("-inf")), target, reduction="none"))
    return torch.stack(losses).mean()


def cosine_regression(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL loss per pair: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), mean over the batch."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


@OBJECTIVES.register("simclr")
class SimCLR(Objective):
    """SimCLR: 2-layer projector + NT-Xent with negatives from the whole (gathered) batch. With
    cfg.n_local_crops > 0 the local crops join as extra views (multi-crop, Caron et al. 2020):
    every view of an image is a positive of every other."""

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.uses_local = cfg.n_local_crops > 0
        self.projector = mlp(encoder.dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, feats, local_feats, views, encoder):
        all_feats = list(feats) + list(local_feats)
        return nt_xent(self.projector(torch.cat(all_feats)), len(all_feats), self.cfg.temperature)


class _EMAObjective(Objective):
    """Student (shared encoder + own head) and an EMA teacher copy of both (BYOL, DINO)."""

    def _init_teacher(self, encoder: nn.Module, head_name: str) -> None:
        self.teacher = frozen_copy(encoder)
        self.teacher_head = frozen_copy(getattr(self, head_name))
        self.student_head_name = head_name  # a name, not a second reference: keeps state_dict keys unique

    @torch.no_grad()
    def teacher_out(self, views) -> torch.Tensor:
        return self.teacher_head(self.teacher(torch.cat(views))).float()

    def update_teacher(self, encoder: nn.Module, momentum: float) -> None:
        ema_update(list(self.teacher.parameters()) + list(self.teacher_head.parameters()),
                   list(encoder.parameters()) + list(getattr(self, self.student_head_name).parameters()), momentum)

    def teachers(self) -> list[nn.Module]:
        return [self.teacher]


@OBJECTIVES.register("byol")
class BYOL(_EMAObjective):
    """BYOL (Grill et al. 2020, arXiv:2006.07733): online projector + predictor regress the EMA
    target's projection of the other view; loss sum_{i != j} (2 - 2 cos(p_i, t_j)) / (V - 1)."""

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.projector = mlp(encoder.dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim)
        self._init_teacher(encoder, "projector")

    def forward(self, feats, local_feats, views, encoder):
        v = len(feats)
        p = self.predictor(self.projector(torch.cat(feats))).chunk(v)
        t = self.teacher_out(views).chunk(v)
        return sum(cosine_regression(p[i], t[j]) for i in range(v) for j in range(v) if i != j) / (v - 1)


@OBJECTIVES.register("simsiam")
class SimSiam(Objective):
    """SimSiam (Chen & He 2021, arXiv:2011.10566): 3-layer projector with BN output, bottleneck
    predictor, stop-gradient; loss mean_{i != j} -cos(p_i, sg(z_j)) (in [-1, 1])."""

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.projector = mlp(encoder.dim, cfg.proj_hidden, cfg.proj_dim, layers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, max(cfg.proj_dim // 4, 1), cfg.proj_dim)

    def forward(self, feats, local_feats, views, encoder):
        v = len(feats)
        z = self.projector(torch.cat(feats))
        p = self.predictor(z).chunk(v)
        z = z.detach().chunk(v)
        pairs = [(i, j) for i in range(v) for j in range(v) if i != j]
        return -sum(F.cosine_similarity(p[i].float(), z[j].float(), dim=-1).mean() for i, j in pairs) / len(pairs)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (g fixed to 1)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x):
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def dino_loss(student: list[torch.Tensor], teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float, n_global: int) -> torch.Tensor:
    """DINO cross-entropy (Caron et al. 2021, arXiv:2104.14294). student: list of (B, K) logits of
    every view (global first); teacher: (n_global*B, K) logits of the global views; center (1, K).
    Loss = mean over (teacher view q, student view v != q) of -sum_k softmax((t_q - c)/tt) log softmax(s_v/ts)."""
    targets = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(n_global)
    total, terms = 0.0, 0
    for q, t in enumerate(targets):
        for v, s in enumerate(student):
            if v != q:
                total = total + torch.sum(-t * F.log_softmax(s.float() / student_temp, dim=-1), dim=-1).mean()
                terms += 1
    return total / terms


@OBJECTIVES.register("dino")
class DINO(_EMAObjective):
    """DINO self-distillation: the student matches the centred, sharpened EMA teacher on the other
    views; with cfg.n_local_crops > 0 the student also sees small local crops (multi-crop)."""

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.uses_local = cfg.n_local_crops > 0
        self.head = DINOHead(encoder.dim, cfg.proj_hidden, cfg.dino_out_dim, cfg.dino_bottleneck)
        self._init_teacher(encoder, "head")
        self.register_buffer("center", torch.zeros(1, cfg.dino_out_dim))

    def forward(self, feats, local_feats, views, encoder):
        all_feats = list(feats) + list(local_feats)
        student = self.head(torch.cat(all_feats)).split([len(f) for f in all_feats])
        teacher = self.teacher_out(views)
        loss = dino_loss(list(student), teacher, self.center, self.cfg.dino_student_temp,
                         self.cfg.dino_teacher_temp, len(feats))
        self._update_center(teacher)
        return loss

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        batch_center = all_reduce_mean(teacher.mean(0, keepdim=True))
        m = self.cfg.dino_center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate sample i by (i mod 4) x 90 degrees (balanced classes, no randomness needed since the
    views are already random). x: (B, C, S, S) -> rotated (B, C, S, S), targets (B,) in 0..3."""
    k = torch.arange(len(x), device=x.device) % 4
    out = x
    for r in (1, 2, 3):
        out = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, dims=(2, 3)), out)
    return out, k


@OBJECTIVES.register("rotation")
class Rotation(Objective):
    """4-way rotation prediction (Gidaris et al. 2018, arXiv:1803.07728) on the first view."""

    needs_feats = False

    def __init__(self, cfg: SSLCfg, encoder: nn.Module):
        super().__init__(cfg, encoder)
        self.head = nn.Linear(encoder.dim, 4)

    def forward(self, feats, local_feats, views, encoder):
        x, k = rotate_batch(views[0])
        return F.cross_entropy(self.head(encoder(x)).float(), k)


class SSLModel(nn.Module):
    """Encoder + weighted objectives. forward(views, local_views, rows=None) -> (total loss, {name: loss});
    rows, the batch's (B,) image rows, reach only objectives with needs_rows (deepcluster).
    The global views go through the encoder once (one batch of V*B images) and every objective
    reads those features; this whole module is what DistributedDataParallel wraps."""

    def __init__(self, encoder: nn.Module, cfg: SSLCfg):
        super().__init__()
        self.encoder = encoder
        self.weights = dict(cfg.objectives)
        self.objectives = nn.ModuleDict({name: OBJECTIVES.get(name)(cfg, encoder) for name in cfg.objectives})
        self.needs_feats = any(o.needs_feats for o in self.objectives.values())
        self.uses_local = any(o.uses_local for o in self.objectives.values())

    def forward(self, views: list[torch.Tensor], local_views: list[torch.Tensor] = (),
                rows: torch.Tensor | None = None):
        feats: list[torch.Tensor] = []
        local_feats: list[torch.Tensor] = []
        if self.needs_feats:
            feats = list(self.encoder(torch.cat(views)).chunk(len(views)))
        if self.uses_local and local_views:
            local_feats = list(self.encoder(torch.cat(local_views)).chunk(len(local_views)))
        parts = {name: obj(feats, local_feats, views, self.encoder, *([rows] if obj.needs_rows else []))
                 for name, obj in self.objectives.items()}
        total = sum(self.weights[name] * loss for name, loss in parts.items())
        return total, parts

    def on_epoch_start(self, epoch: int, images) -> None:
        for obj in self.objectives.values():
            obj.on_epoch_start(epoch, self.encoder, images)

    @torch.no_grad()
    def update_teachers(self, momentum: float) -> None:
        for obj in self.objectives.values():
            obj.update_teacher(self.encoder, momentum)

    def compile_encoders(self) -> None:
        """torch.compile the student encoder and EMA teachers in place (state_dict keys unchanged)."""
        self.encoder.compile()
        for obj in self.objectives.values():
            for t in obj.teachers():
                t.compile()

