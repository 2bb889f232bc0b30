"""Linearised fine-tuning (LQF, Achille et al., CVPR 2021) of a trained family's members.

A member with weights w0 is replaced by its first-order Taylor expansion in the weights,

    g(x; dw) = f(x; w0) + J(x; w0) dw        (torch.func.jvp: one forward pass carries both terms)

and only dw is trained, by least squares to scaled one-hot targets through the frozen shared classifier
(plus, optionally, the squared distance to the previous cloud's embedding of the same image) with an L2
penalty on dw.  Every term is quadratic in dw: the objective is convex, its minimum does not depend on the
seed or on the order of the data, and it is reached by full-batch conjugate gradients preconditioned with
the Kronecker-factored curvature (K-FAC) of curvlinops-for-pytorch.

K-FAC once, never refreshed: the linearised model's Jacobian is J(x; w0) whatever dw is, and the
least-squares loss has a constant Hessian, so the objective's Gauss-Newton matrix (its Hessian) is the same
at every step; a refresh would recompute the same factors.  curvlinops' Monte-Carlo Fisher with one sample
(fixed seed: deterministic) is used rather than its exact "type-2" one, which backpropagates once per class
instead of once; conjugate gradients only need a preconditioner, not an exact one.

What is linearised: the weights of the layers curvlinops' K-FAC supports (Conv2d, Linear).  BatchNorm runs
in eval mode (an affine map with the running statistics of w0) and its scale and shift stay at w0; any
other layer with parameters is refused, named.  The network must be piecewise linear in its input
(ReLU, ReLU6, leaky ReLU; `activation: leaky_relu` is the variant without flat sides): a smooth activation
is refused, named, and library backbones (timm/, torchvision/), whose activations may hide in their forward
code, are refused as a whole.
"""
from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from hetero.errors import ConfigError, TrainingError, reason
from hetero.models import Embedder, is_library_arch, resize_to

log = logging.getLogger("hetero.training.lqf")

KFAC_LAYERS = (nn.Linear, nn.Conv2d)  # curvlinops' KFACLinearOperator._SUPPORTED_MODULES
FROZEN_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)  # eval-mode affine maps, kept at w0
PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Identity)


def check_linearisable(member: Embedder, name: str) -> None:
    """Refuse a member whose network is not piecewise linear, naming the first smooth activation."""
    if is_library_arch(member.arch):
        raise ConfigError(f"train.mode: lqf: member {name!r} is a library backbone ({member.arch}) whose "
                          f"activations cannot be checked to be piecewise linear; LQF takes hetero's own "
                          f"architectures (resnet, mobilenet, best with activation: leaky_relu)")
    for path, module in member.named_modules():
        activation = type(module).__module__ == "torch.nn.modules.activation"
        if activation and not isinstance(module, PIECEWISE_LINEAR):
            raise ConfigError(f"train.mode: lqf: member {name!r} has a {type(module).__name__} activation at "
                              f"{path!r}, which is not piecewise linear; LQF needs ReLU-like activations "
                              f"(use activation: leaky_relu on a resnet or mobilenet member)")


def kfac_parameters(member: nn.Module, name: str) -> tuple[list[str], list[str]]:
    """(parameters LQF trains: those of layers K-FAC supports, layers kept at w0); other layers refused."""
    trained, frozen, unsupported = [], [], []
    for path, module in member.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        if isinstance(module, KFAC_LAYERS):
            trained += [f"{path}.{p}" for p in own]
        elif isinstance(module, FROZEN_LAYERS):
            frozen.append(path)
        else:
            unsupported.append(f"{path} ({type(module).__name__})")
    if unsupported:
        raise ConfigError(f"train.mode: lqf: K-FAC (curvlinops) supports {', '.join(t.__name__ for t in KFAC_LAYERS)} "
                          f"layers (and LQF keeps BatchNorm at its weights); member {name!r} has parameters in "
                          f"{', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}")
    return trained, frozen


class Linearised(nn.Module):
    """A member's first-order Taylor expansion in its weights around w0: f(x; w0) + J(x; w0) dw.

    `raw` is the linear output the loss sees; `forward` L2-normalises it (the embedding contract).  The base
    network stays frozen in eval mode; `delta` (dw, one tensor per trained parameter) is all that learns.
    """

    def __init__(self, base: Embedder, names: list[str]):
        super().__init__()
        self.base = base.eval().requires_grad_(False)
        self.names = list(names)
        params = dict(base.named_parameters())
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(params[n])) for n in self.names])
        self.input_size, self.dim = base.input_size, base.dim

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the expansion point includes BatchNorm's running statistics
        return self

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        fixed = {**dict(self.base.named_parameters()), **dict(self.base.named_buffers())}

        def network(*weights):
            return functional_call(self.base, {**fixed, **dict(zip(self.names, weights))}, (images,))

        out, tangent = jvp(network, tuple(fixed[n] for n in self.names), tuple(self.delta))
        return out + tangent

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(images), dim=1)

    def merged(self) -> Embedder:
        """Ordinary weights w0 + dw: the same architecture, exported like any member."""
        model = copy.deepcopy(self.base)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, delta in zip(self.names, self.delta):
                params[name].add_(delta)
        return model.requires_grad_(True).eval()


class _Logits(nn.Module):
    """The network the least-squares loss sees at w0: embedding (before L2 normalisation) times prototypes."""

    def __init__(self, member: Embedder, prototypes: torch.Tensor):
        super().__init__()
        self.member = member
        self.register_buffer("prototypes", prototypes)

    def forward(self, images):
        return self.member(resize_to(images, self.member.input_size)) @ self.prototypes.T


def _kfac_inverse(member: Embedder, names: list[str], prototypes, images, targets, batch_size: int, damping: float):
    """The damped inverse of K-FAC's approximation of the least-squares loss's Gauss-Newton matrix at w0."""
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    member.eval().requires_grad_(True)
    params = dict(member.named_parameters())
    data = [(images[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    kfac = KFACLinearOperator(_Logits(member, prototypes), nn.MSELoss(reduction="mean"), [params[n] for n in names],
                              data, fisher_type="mc", mc_samples=1, check_deterministic=False, num_data=len(images))
    kfac.compute_kronecker_factors()  # now, while w0 still requires grad (curvlinops computes them lazily)
    inverse = KFACInverseLinearOperator(kfac, damping=damping)
    inverse @ [torch.zeros_like(params[n]) for n in names]  # and the inverted factors, cached
    return inverse


def preconditioner(member: Embedder, name: str, images: torch.Tensor, labels: torch.Tensor,
                   prototypes: torch.Tensor, settings, batch_size: int):
    """The inverse K-FAC matrix `fine_tune` preconditions with.  It depends on the member, the images and the
    targets only, not on `compat_weight` (the pull towards the previous cloud is left out of it), so one
    serves every weight of the `auto` search."""
    check_linearisable(member, name)
    names, _ = kfac_parameters(member, name)
    targets = settings.target_scale * F.one_hot(labels, len(prototypes)).float()
    try:
        return _kfac_inverse(member, names, prototypes, images, targets, batch_size, settings.damping)
    except torch.linalg.LinAlgError as err:  # curvlinops inverts each damped Kronecker factor by Cholesky
        raise TrainingError(f"train.lqf.damping: the curvature (K-FAC) of member {name!r} plus damping "
                            f"{settings.damping:g} is not positive definite, so it cannot be inverted ({reason(err)}); "
                            f"raise train.lqf.damping, ten times at a time (try {settings.damping * 10:g}). A member "
                            f"whose activations are very large needs more: check its weights in train.previous"
                            ) from None


def fine_tune(member: Embedder, name: str, images: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
              reference: torch.Tensor | None, compat_weight: float, settings, steps: int, weight_decay: float,
              batch_size: int, inverse=None) -> tuple[Linearised, dict]:
    """LQF of one member on float images in [0, 1]; returns the trained expansion and what happened.

    `prototypes` are the frozen shared classifier's unit class vectors (one row per label), `reference` the
    previous cloud's embeddings of `images` for the compatibility term of weight `compat_weight` (None or 0:
    no such term).  The convex
    quadratic objective is minimised by `steps` iterations of conjugate gradients preconditioned with the
    inverse K-FAC matrix (`preconditioner`'s, computed here unless `inverse` is it): each costs one pass over
    the data, needs no learning rate (the step length is exact on a quadratic) and is deterministic.
    """
    check_linearisable(member, name)
    names, frozen = kfac_parameters(member, name)
    started = time.time()
    targets = settings.target_scale * F.one_hot(labels, len(prototypes)).float()
    if inverse is None:
        inverse = preconditioner(member, name, images, labels, prototypes, settings, batch_size)
    kfac_seconds = time.time() - started
    model = Linearised(member, names)
    compat = compat_weight if reference is not None else 0.0

    def gradient_at(point: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """The objective and its full-batch gradient with dw = point (one pass, in chunks)."""
        with torch.no_grad():
            for delta, value in zip(model.delta, point):
                delta.copy_(value)
        model.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, len(images), batch_size):
            rows = slice(i, i + batch_size)
            out = model.raw(resize_to(images[rows], model.input_size))
            loss = F.mse_loss(out @ prototypes.T, targets[rows])
            if compat:
                loss = loss + compat * F.mse_loss(out, reference[rows])
            share = len(out) / len(images)
            (loss * share).backward()
            total += loss.item() * share
        with torch.no_grad():
            grads = [d.grad + weight_decay * d for d in model.delta]
            total += 0.5 * weight_decay * sum(d.pow(2).sum() for d in model.delta).item()
        return total, grads

    def dot(a, b) -> float:
        return sum((x * y).sum() for x, y in zip(a, b)).item()

    zero = [torch.zeros_like(d) for d in model.delta]
    start, grad0 = gradient_at(zero)
    solution = [z.clone() for z in zero]
    residual = [-g for g in grad0]  # -gradient of the quadratic at the current solution
    preconditioned = list(inverse @ residual)
    direction = [z.clone() for z in preconditioned]
    history = [start]
    for _ in range(steps):
        _, at_direction = gradient_at(direction)
        curved = [a - g for a, g in zip(at_direction, grad0)]  # H p, exact: the objective is quadratic
        rz = dot(residual, preconditioned)
        alpha = rz / dot(direction, curved)
        solution = [s + alpha * p for s, p in zip(solution, direction)]
        residual = [r - alpha * c for r, c in zip(residual, curved)]
        # f(dw) = f(0) + (grad f(0) - r) . dw / 2 on a quadratic: the objective without another pass
        history.append(start + 0.5 * dot([g - r for g, r in zip(grad0, residual)], solution))
        log.info("lqf %s step %d: objective %.6f", name, len(history) - 1, history[-1])
        preconditioned = list(inverse @ residual)
        beta = dot(residual, preconditioned) / rz
        direction = [z + beta * p for z, p in zip(preconditioned, direction)]
    with torch.no_grad():
        for delta, value in zip(model.delta, solution):
            delta.copy_(value)
            delta.grad = None
    facts = {"compat_weight": compat, "linearised_parameters": sum(d.numel() for d in model.delta),
             "linearised_layers": len(names),
             "frozen_layers": frozen, "kfac_seconds": round(kfac_seconds, 2),
             "seconds": round(time.time() - started, 2), "objective_first": round(history[0], 6),
             "objective_last": round(history[-1], 6), "relative_update": round(_relative_norm(model), 6)}
    return model.eval(), {"member": name, **facts, "history": [round(h, 6) for h in history]}


def _relative_norm(model: Linearised) -> float:
    """||dw|| / ||w0|| over the linearised parameters: how small the update is."""
    params = dict(model.base.named_parameters())
    with torch.no_grad():
        delta = sum(d.pow(2).sum() for d in model.delta).sqrt()
        base = sum(params[n].pow(2).sum() for n in model.names).sqrt()
    return float(delta / base)


def load_linearised(store, name: str) -> Linearised:
    """An LQF update's member as the linearised model itself: its w0 (checked) and dw = checkpoint - w0."""
    base = store.load_linearisation_point(name)
    merged = dict(store.load_member(name).named_parameters())
    names, _ = kfac_parameters(base, name)
    model = Linearised(base, names)
    with torch.no_grad():
        for delta, param_name in zip(model.delta, names):
            delta.copy_(merged[param_name] - dict(base.named_parameters())[param_name])
    return model.eval()
