"""Learning an initialisation: MAML (Finn, Abbeel & Levine 2017), first-order MAML (same paper,
sec. 5.2), Reptile (Nichol, Achiam & Schulman 2018) and Meta-SGD (Li et al. 2017).

The adapted parameters are the encoder's last block (see src/meta/base.py) plus a linear head,
evaluated with ``torch.func.functional_call`` on a dict of (possibly non-leaf) tensors, so the
inner loop is plain tensor algebra and second-order gradients flow through it.

* **Head for any N.** Episodes are n_way-way but the competition is C-way, so every task's
  linear head starts at zero (the "zeroing trick" of Kao et al. 2022, "MAML is a Noisy Contrastive
  Learner in Classification"): invariant to the order of the labels and valid for any number of
  classes. A meta-learned vector copied into every row (Ye & Chao 2022) would be equivalent: the
  softmax ignores a shift shared by all rows, so such a vector gets no gradient at all. The
  meta-learned initialisation is therefore the last block's weights (and, for Meta-SGD, the
  inner learning rates, the head's included).
* **Batch norm.** The adapted block's BatchNorm layers are replaced by :class:`SupportBatchNorm`:
  statistics always come from the current task's *support* images -- the inner loop normalises the
  support with its own statistics, and queries are normalised with the support's statistics
  (concatenated after the support in one forward). No running statistics are kept or used. This is
  the "MetaBN" choice of Bronskill et al. 2020 (TaskNorm): per-task like MAML's transductive
  batch norm, but a query's prediction does not depend on which other queries share its batch, so
  one held-out image (leave-one-out) and 10,000 test images are treated alike.
* **Features** enter the head L2-normalised and scaled by ``meta.temperature`` (a cosine
  classifier, as in Chen et al. 2019, "A Closer Look at Few-shot Classification"), so one inner
  learning rate suits any encoder's feature scale.
* **first_order** drops the second-order term: inner gradients are computed without a graph, so the
  meta-gradient is the query gradient at the adapted weights (FO-MAML). ``maml`` follows
  ``meta.first_order``; ``fomaml`` is always first-order.
* **Reptile** needs no query gradient: after ``inner_steps`` SGD steps on the task's images the
  initialisation moves a fraction epsilon of the way to the adapted weights (averaged over the
  meta-batch); epsilon decays linearly from ``meta.reptile_epsilon`` to 0 (Nichol et al.).
* **Meta-SGD** also meta-learns one inner learning rate per parameter entry (initialised at
  ``meta.inner_lr``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from src.meta import META_METHODS
from src.meta.base import MetaMethod, Task, masked_softmax, one_hot

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Batch norm with support statistics
# ---------------------------------------------------------------------------------------------
class SupportBatchNorm(nn.Module):
    """BatchNorm{1,2}d whose mean/variance come from the first ``n_ref`` samples of the batch (all
    samples when n_ref is None), in train and eval mode alike. Keeps the wrapped layer's parameter
    names (weight, bias), so functional_call dicts stay valid."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=bn.weight.requires_grad)
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad)
        self.eps = bn.eps
        self.n_ref: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = x if self.n_ref is None else x[:self.n_ref]
        dims = [0] + list(range(2, x.dim()))  # every axis but channels
        mean = ref.mean(dims, keepdim=True)
        var = ref.var(dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def use_support_batchnorm(module: nn.Module) -> int:
    """Replace every affine BatchNorm under `module` by SupportBatchNorm; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.affine:
                setattr(parent, name, SupportBatchNorm(child))
                count += 1
    return count


@contextlib.contextmanager
def support_statistics(module: nn.Module, n_support: int | None):
    """Within the block, SupportBatchNorm layers take statistics from the first n_support samples."""
    layers = [m for m in module.modules() if isinstance(m, SupportBatchNorm)]
    for m in layers:
        m.n_ref = n_support
    try:
        yield
    finally:
        for m in layers:
            m.n_ref = None


# ---------------------------------------------------------------------------------------------
# The inner loop
# ---------------------------------------------------------------------------------------------
def inner_adapt(logits_fn: Callable[[Params, torch.Tensor], torch.Tensor], params: Params, x: torch.Tensor,
                y: torch.Tensor, steps: int, lr: float | Params, create_graph: bool) -> Params:
    """`steps` gradient steps theta <- theta - lr * grad CE(logits_fn(theta, x), y), the
    cross-entropy class-balanced (see balanced_weights).

    lr: one float, or one tensor per parameter name (Meta-SGD, broadcast against the parameter).
    create_graph=True keeps the graph of the gradients (second-order MAML); False makes them
    constants, so d(theta')/d(theta) = I (first-order MAML, Reptile, test-time adaptation)."""
    for _ in range(steps):
        logits = logits_fn(params, x)
        loss = F.cross_entropy(logits, y, weight=balanced_weights(y, logits.shape[1], logits.dtype))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        params = {name: p if g is None else p - (lr[name] if isinstance(lr, dict) else lr) * g
                  for (name, p), g in zip(params.items(), grads)}
    return params


def balanced_weights(y: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-class CE weights 1 / count (classes absent: 0): every class of the support weighs the same.
    Without it a zero-initialised head first learns the support's class frequencies, and under
    leave-one-out the held-out image's class is the one with a missing image: it would be
    predicted against, systematically."""
    counts = one_hot(y, n_classes, dtype).sum(0)
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))


@META_METHODS.register("maml")
class MAML(MetaMethod):
    name = "maml"
    task_augment = True
    first_order: bool | None = None  # None: follow cfg.meta.first_order
    learn_inner_lr = False  # Meta-SGD

    def __init__(self, cfg, body, device="cpu", precision="fp32"):
        super().__init__(cfg, body, device, "fp32")  # fp32: second-order terms are fragile in bf16
        use_support_batchnorm(self.body)
        self.fast_names = [n for n, p in self.body.named_parameters() if p.requires_grad]
        if self.learn_inner_lr:
            shapes = {n: p.shape for n, p in self.body.named_parameters() if p.requires_grad}
            shapes.update({"head.weight": (1, self.dim), "head.bias": (1,)})
            self.inner_lrs = nn.ParameterDict({_key(n): nn.Parameter(torch.full(s, float(cfg.inner_lr)))
                                               for n, s in shapes.items()})

    @property
    def is_first_order(self) -> bool:
        return self.cfg.first_order if self.first_order is None else self.first_order

    def init_params(self, n_way: int) -> Params:
        """Initial fast weights for an n_way task: the body's trainable tensors + a zero head."""
        params = dict(self.body.named_parameters())
        fast = {n: params[n] for n in self.fast_names}
        fast["head.weight"] = torch.zeros(n_way, self.dim, device=self.device, requires_grad=True)
        fast["head.bias"] = torch.zeros(n_way, device=self.device, requires_grad=True)
        return fast

    def inner_lr(self) -> float | Params:
        if not self.learn_inner_lr:
            return self.cfg.inner_lr
        return {n: self.inner_lrs[_key(n)] for n in [*self.fast_names, "head.weight", "head.bias"]}

    def logits(self, params: Params, x: torch.Tensor, n_support: int | None = None) -> torch.Tensor:
        """Head logits (B, N) of inputs x with fast weights `params`; batch-norm statistics from the
        first n_support rows (None: all rows)."""
        with support_statistics(self.body, n_support):
            body_params = {n: params[n] for n in self.fast_names}
            h = functional_call(self.body, body_params, (x,)) if body_params else self.body(x)
        h = self.cfg.temperature * F.normalize(h.float(), dim=1)  # fixed-norm features: encoder-independent inner lr
        return F.linear(h, params["head.weight"], params["head.bias"])

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, n_way: int, steps: int, create_graph: bool) -> Params:
        return inner_adapt(self.logits, self.init_params(n_way), xs, ys, steps, self.inner_lr(), create_graph)

    def query_loss(self, task: Task, create_graph: bool) -> torch.Tensor:
        fast = self.adapt(task.xs, task.ys, task.n_way, self.cfg.inner_steps, create_graph)
        n = len(task.xs)
        logits = self.logits(fast, torch.cat([task.xs, task.xq]), n_support=n)[n:]
        return F.cross_entropy(logits, task.yq)

    def step(self, tasks: list[Task], iteration: int) -> torch.Tensor:
        self.train()
        if self.optimizer is None:  # nothing to meta-learn (frozen embeddings): report the loss only
            return torch.stack([self.query_loss(t, create_graph=False).detach() for t in tasks]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for task in tasks:  # backward per task: one task's graph in memory at a time
            loss = self.query_loss(task, create_graph=not self.is_first_order) / len(tasks)
            loss.backward()
            total = total + loss.detach()
        self.optimizer.step()
        return total

    def predict(self, xs, ys, xq, n_classes, batch_size=512):
        """Adapt the initialisation to the support for meta.test_inner_steps steps, then classify."""
        self.eval()
        with torch.enable_grad():
            fast = self.adapt(xs, ys, n_classes, self.cfg.test_inner_steps, create_graph=False)
        fast = {k: v.detach() for k, v in fast.items()}
        present = torch.bincount(ys, minlength=n_classes) > 0
        out = []
        with torch.no_grad():
            for i in range(0, len(xq), batch_size):
                logits = self.logits(fast, torch.cat([xs, xq[i:i + batch_size]]), n_support=len(xs))[len(xs):]
                out.append(masked_softmax(logits, present))
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, n_classes), np.float32)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


@META_METHODS.register("fomaml")
class FOMAML(MAML):
    name = "fomaml"
    first_order = True


@META_METHODS.register("metasgd")
class MetaSGD(MAML):
    name = "metasgd"
    learn_inner_lr = True


@META_METHODS.register("reptile")
class Reptile(MAML):
    name = "reptile"
    first_order = True

    def setup(self) -> None:
        self.to(self.device)
        self.optimizer = None  # the outer update is Reptile's interpolation, not an optimiser
        total = max(self.cfg.episodes, 1)
        # Linear decay of the outer step size, computed up front (Nichol et al. 2018, sec. 6).
        self.epsilons = [self.cfg.reptile_epsilon * (1.0 - it / total) for it in range(total)]

    def step(self, tasks: list[Task], iteration: int) -> torch.Tensor:
        self.train()
        adapted, total = [], torch.zeros((), device=self.device)
        for task in tasks:
            x, y = torch.cat([task.xs, task.xq]), torch.cat([task.ys, task.yq])  # all of the task's images
            start = {k: v.detach().requires_grad_() for k, v in self.init_params(task.n_way).items()}
            with torch.enable_grad():
                fast = inner_adapt(self.logits, start, x, y, self.cfg.inner_steps, self.cfg.inner_lr, False)
            fast = {k: v.detach() for k, v in fast.items()}
            with torch.no_grad():
                total = total + F.cross_entropy(self.logits(fast, x), y) / len(tasks)
            adapted.append(fast)
        reptile_update(self, adapted, self.epsilons[min(iteration, len(self.epsilons) - 1)])
        return total


@torch.no_grad()
def reptile_update(method: MAML, adapted: list[Params], epsilon: float) -> None:
    """theta <- theta + epsilon * mean_tasks(theta_task - theta) for the body's trainable tensors
    (the head restarts at zero in every task)."""
    params = dict(method.body.named_parameters())
    for name in method.fast_names:
        p = params[name]
        p.add_(epsilon * (torch.stack([a[name] for a in adapted]).mean(0) - p))
