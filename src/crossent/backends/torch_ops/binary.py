r"""Fused binary / multi-label (sigmoid) cross-entropy family: loss and gradient in one pass.

This is the torch path: it runs on any device, and is the fast path on the CPU. The logits are
processed in blocks of about :data:`BLOCK_ELEMENTS` elements (1 MiB of fp32, cache-sized); for
each block one read of the logits yields the per-element loss and its gradient, written once
into the gradient buffer, which is the only allocation of the logits' size. On other devices
and under ``torch.compile`` the whole tensor is one block (the compiler or the Triton kernels
fuse the passes there).

The formulation (see :func:`crossent.binary_cross_entropy`), per element, with
:math:`p = \sigma(x)`, the smoothed target :math:`t` (written ``t`` below for :math:`t'`), the
probability shift :math:`c` (``clip``; 0 outside the asymmetric loss),
:math:`p_m = \max(p - c, 0)` and :math:`m = [p > c]`:

.. math::

    b &= -\bigl[w_+ t \log p + (1 - t) \log(1 - p_m)\bigr] \\
    1 - p_t &= t (1 - p) + (1 - t) p_m \\
    L &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}\, b + w\, \alpha_t\, \epsilon_1 (1 - p_t),
        \quad \gamma_t = \gamma_+ t + \gamma_- (1 - t),
        \quad \alpha_t = \alpha t + (1 - \alpha)(1 - t)

with :math:`\epsilon_1` = ``poly1`` (the Poly-1 term of Leng et al. 2022; 0 by default).

Gradient. :math:`\alpha_t, \gamma_t` depend on the constant target only; with
:math:`s = dp/dx = p (1 - p)` and :math:`d p_m / dx = m s`,

.. math::

    D &= \frac{d(1 - p_t)}{dx} = s\,[m (1 - t) - t] \\
    \frac{db}{dx} &= -w_+ t (1 - p) + (1 - t)\, \frac{m s}{1 - p_m} \\
    \frac{dL}{dx} &= w\, \alpha_t\, (1 - p_t)^{\gamma_t}
        \Bigl[\gamma_t\, \frac{D}{1 - p_t}\, b + \frac{db}{dx}\Bigr]

which is :math:`w \alpha_t [\gamma_t (1-p_t)^{\gamma_t - 1} D b + (1-p_t)^{\gamma_t} b']` with
:math:`(1 - p_t)^{\gamma_t - 1}` -- infinite for :math:`\gamma_t < 1` at :math:`p_t \to 1` --
replaced by the finite ratio :math:`D / (1 - p_t)`. The Poly-1 term adds
:math:`w \alpha_t \epsilon_1 D`; ``detach_focal_weight`` (Ridnik et al. 2021's
``disable_torch_grad_focal_loss``) drops the :math:`\gamma_t D b / (1 - p_t)` term, so the
focal weight acts as a constant: :math:`w \alpha_t (1 - p_t)^{\gamma_t}\, db/dx`. For ``clip = 0``,
:math:`|D| / (1 - p_t) = p (1-p) |1 - 2t| / (t (1-p) + (1-t) p) \le 1`; for ``clip > 0`` it grows
like :math:`s / p_m` as :math:`p_m \to 0` on a negative, where :math:`b \approx p_m` vanishes
with it, so the product stays finite.

Numerics: :math:`\log p = -\operatorname{softplus}(-x)` and
:math:`\log(1 - p) = -\operatorname{softplus}(x)`, :math:`1 - p = \sigma(-x)` (never ``1 - p``,
which rounds to 0 for x > 17 in fp32), and :math:`1 - p_t` is a convex combination of
:math:`\sigma(-x)` and :math:`p_m`, so it carries no cancellation. The focal factor is
``pow(1 - p_t, gamma_t)``, i.e. :math:`\exp(\gamma_t \log(1 - p_t))` with the IEEE rule
:math:`0^0 = 1` guarding :math:`\gamma_t = 0` where :math:`1 - p_t` underflows to 0.

Blocks whose targets are all 0/1 (with one gamma, no clip, smoothing, ignore_index or poly1: BCE and
the sigmoid focal loss on hard labels) take :func:`_hard_elements`, the same formula in the
signed logit :math:`z = (2t - 1) x`, with half the transcendental functions and its work
buffers reused across blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from crossent._formula import inverse_or_zero
from crossent._options import BinaryCall, BinaryOptions
from crossent.backends.torch_ops._memory import empty_hugepage

__all__ = ["BLOCK_ELEMENTS", "HARD_SCRATCH_ROWS", "binary_cross_entropy", "binary_elements"]

#: Elements per block on the CPU (fp32: 1 MiB), as in the softmax kernel.
BLOCK_ELEMENTS = 1 << 18
#: Block-sized work buffers of the hard-target path (allocated once per call).
HARD_SCRATCH_ROWS = 7


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 accumulate in fp32; fp64 stays fp64 (gradcheck).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(shape: tuple[int, ...], block: int) -> Iterator[tuple[int | slice, ...]]:
    """Index tuples that split a tensor of ``shape`` into blocks of about ``block`` elements.

    Each block is a slice of whole trailing sub-tensors along one dim (the first dim whose
    trailing size fits in a block), so an expanded (broadcast) weight can be indexed with the
    same tuple without being materialised.
    """
    numel = 1
    for s in shape:
        numel *= s
    if numel <= block:  # also 0-d and empty tensors
        yield ()
        return
    inner = numel
    d = 0
    for d, size in enumerate(shape):  # noqa: B007 -- d is used after the loop
        inner //= size  # elements in one index of dim d
        if inner <= block:
            break
    rows = max(1, block // inner)
    for lead in itertools.product(*(range(s) for s in shape[:d])):
        for r0 in range(0, shape[d], rows):
            yield (*lead, slice(r0, min(shape[d], r0 + rows)))


def binary_elements(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    opts: BinaryOptions,
    grad_out: Tensor | None,
    grad_scale: Tensor | float = 1.0,
    scratch: Tensor | None = None,
) -> Tensor:
    """Per-element loss of a block, and (optionally) its gradient written into ``grad_out``.

    Args:
        x: logits of any float dtype (read only, any strides).
        target: targets of x's shape (float, int or bool; ``opts.ignore_index`` marks masked).
        weight, pos_weight: tensors of x's shape (possibly expanded views) in the accumulation
            dtype, or None.
        opts: validated options.
        grad_out: buffer of x's shape receiving ``grad_scale * dL/dx``; None for forward only.
        grad_scale: scalar multiplying the gradient (1 / count for a mean).
        scratch: (HARD_SCRATCH_ROWS, >= x.numel()) work buffer of the accumulation dtype for
            the hard-target path, reused across blocks (allocated here when None).

    Returns:
        Per-element losses in the accumulation dtype (fp32, or fp64 for fp64 input).
    """
    acc = _acc_dtype(x.dtype)
    x = x.to(acc)  # a view when x is already fp32/fp64: nothing below writes into x
    if _hard_path_applies(opts) and not _compiling():  # a data-dependent branch
        t = target.to(acc)
        # t (1 - t) >= 0 is 0 exactly for t in {0, 1} (targets lie in [0, 1]), so its sum is 0
        # iff every target of the block is hard (a sum of non-negative terms cannot cancel).
        tt = torch.empty_like(t) if scratch is None else scratch[0, : t.numel()].view(t.shape)
        if not bool(torch.addcmul(t, t, t, value=-1.0, out=tt).sum() > 0):
            return _hard_elements(x, t, weight, pos_weight, opts, grad_out, grad_scale, scratch)
    valid: Tensor | None = None
    if opts.ignore_index is not None:
        valid = target != opts.ignore_index
        t = torch.where(valid, target.to(acc), 0.0)  # masked entries read as 0: nothing is nan
    else:
        t = target.to(acc)  # may be a view of the caller's target: never written in place
    eps = opts.label_smoothing
    if eps:
        t = t.mul(1.0 - eps).add_(eps / 2)  # towards 1/2: the K = 2 case of t(1-eps) + eps/K

    # softplus returns x itself above `threshold`; log1p(exp(-x)) < 2e-9 there in fp32, but fp64
    # needs a higher threshold to keep full relative precision.
    thr = 40.0 if acc == torch.float64 else 20.0
    nx = torch.neg(x)
    ell_p = F.softplus(nx, threshold=thr)  # -log p, exact as p -> 0 (no log of a rounded p)
    p = torch.sigmoid(x)
    q = torch.sigmoid(nx)  # 1 - p, accurate as p -> 1 where 1 - p rounds to 0
    c = opts.clip
    if c == 0.0:
        pm = p
        ell_n = F.softplus(x, threshold=thr)  # -log(1 - p)
    else:
        pm = torch.sub(p, c).clamp_min_(0.0)  # shifted probability of the asymmetric loss
        ell_n = torch.neg(pm).log1p_().neg_()  # -log(1 - p_m), exact as p_m -> 0
    pw = pos_weight
    # b = pw t ell_p + (1 - t) ell_n; lerp returns its end points exactly for t in {0, 1}.
    ell_pw = ell_p if pw is None else ell_p * pw
    b = torch.lerp(ell_n, ell_pw, t)
    if _compiling() or x.device.type != "cpu" or bool(torch.isinf(x).any()):
        # At an infinite logit one side is inf, and lerp's 0 * inf (or inf - inf) is nan where
        # the side without target mass should add nothing (a masked negative: x = -inf, t = 0,
        # loss 0) or the loss is inf (soft targets): the sum of the two sides, term by term.
        both = torch.mul(ell_pw, t).add_(torch.rsub(t, 1.0).mul_(ell_n))
        b = torch.where(t == 0, ell_n, torch.where(t == 1, ell_pw, both))

    # Element multiplier w * alpha_t (None when both are 1).
    mult: Tensor | None = None
    if opts.alpha is not None:
        a = opts.alpha
        mult = t.mul(2.0 * a - 1.0).add_(1.0 - a)  # alpha t + (1 - alpha)(1 - t)
        if weight is not None:
            mult.mul_(weight)
    elif weight is not None:
        mult = weight  # an (expanded) view: used read-only below

    gam: Tensor | float = 0.0
    poly1 = opts.poly1
    if opts.focal or poly1:
        denom = torch.lerp(pm, q, t)  # 1 - p_t = t (1 - p) + (1 - t) p_m: no cancellation
    if opts.focal:
        gp, gn = opts.gamma_pos, opts.gamma_neg
        gam = gp if gp == gn else t.mul(gp - gn).add_(gn)  # gamma_t = gp t + gn (1 - t)
        # (1 - p_t)^gamma_t = exp(gamma_t log(1 - p_t)); pow keeps IEEE's 0^0 = 1, so a
        # gamma_t of 0 (e.g. gamma_pos = 0 in ASL) gives exactly 1 where 1 - p_t underflows.
        factor = torch.pow(denom, gam)
        loss = factor * b
    else:
        loss = b
    if poly1:
        # Poly-1 (Leng et al. 2022): + poly1 (1 - p_t), under w alpha_t only (no pos_weight,
        # no focal factor)
        loss = loss.add_(denom, alpha=poly1) if loss is not b else torch.add(b, denom, alpha=poly1)
    if mult is not None:
        loss = loss.mul_(mult) if loss is not b else loss * mult
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)  # where, not *: masked inf/nan logits stay out

    if grad_out is None:
        return loss

    s = p * q  # dp/dx = p (1 - p)
    neg_pw_q = torch.neg(q) if pw is None else q * pw.neg()
    if c == 0.0:
        # db/dx = (1 - t) p - pw t (1 - p). Not p - t: p rounds to 1 for x > 17 in fp32, and
        # p - 1 = 0 would drop the -(1 - p) that the focal gradient of a positive rests on.
        db = torch.lerp(p, neg_pw_q, t)
    else:
        m = pm > 0  # the clip kink: dp_m/dx = s where p > clip, else 0
        # d[-log(1 - p_m)]/dx = m s / (1 - p_m), with 1 - p_m = (1 - p) + clip where p > clip
        dn = torch.div(s, q + c).mul_(m)
        db = torch.lerp(dn, neg_pw_q, t)
    detach = opts.detach_focal_weight
    if (opts.focal and not detach) or poly1:
        # D = d(1 - p_t)/dx = s [m (1 - t) - t]
        if c == 0.0:
            D = torch.addcmul(s, s, t, value=-2.0)  # s (1 - 2t)
        else:
            sm = s * m
            D = torch.addcmul(sm, t, s + sm, value=-1.0)
    if opts.focal and detach:
        # disable_torch_grad_focal_loss: the focal weight is a constant, dL/dx = F db/dx
        g = db.mul_(factor)
    elif opts.focal:
        # gamma_t (1 - p_t)^(gamma_t - 1) D b written as gamma_t F (D / (1 - p_t)) b: the ratio
        # is finite (see the module docstring); where 1 - p_t underflows, D and b are ~0 too
        # and the clamp keeps 0/0 out. (Out of place when the Poly-1 term still needs D.)
        den = denom.clamp_min(torch.finfo(acc).tiny)
        ratio = (D.div(den) if poly1 else D.div_(den)).mul_(b)
        if isinstance(gam, Tensor):
            g = ratio.mul_(gam).add_(db)
        else:
            g = db.add_(ratio, alpha=gam)
        g.mul_(factor)
    else:
        g = db
    if poly1:
        g.add_(D, alpha=poly1)  # the Poly-1 term's derivative: poly1 d(1 - p_t)/dx
    if mult is not None:
        g.mul_(mult)
    if valid is not None:
        g = torch.where(valid, g, 0.0)
    if isinstance(grad_scale, float) and grad_scale == 1.0:
        grad_out.copy_(g)  # rounded once to the logits' dtype
    elif grad_out.dtype == acc:
        torch.mul(g, grad_scale, out=grad_out)
    else:
        grad_out.copy_(g.mul_(grad_scale))
    return loss


def _hard_path_applies(opts: BinaryOptions) -> bool:
    return (
        opts.clip == 0.0
        and opts.label_smoothing == 0.0
        and opts.gamma_pos == opts.gamma_neg
        and opts.ignore_index is None
        and opts.poly1 == 0.0
    )


def _hard_elements(
    x: Tensor,
    t: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    opts: BinaryOptions,
    grad_out: Tensor | None,
    grad_scale: Tensor | float,
    scratch: Tensor | None = None,
) -> Tensor:
    r"""Fast path of :func:`binary_elements` for 0/1 targets, one gamma, no clip or smoothing.

    With the sign :math:`s = 2t - 1` and :math:`z = s x`, :math:`p_t = \sigma(z)` and
    :math:`b = w_+^t (-\log p_t)`, so with :math:`\ell = -\log p_t` and the constant
    multiplier :math:`k = w\, \alpha_t\, w_+^t` (:math:`w_+^t = w_+` on positives, 1 on
    negatives):

    .. math::

        L = k\, (1 - p_t)^\gamma \ell, \qquad
        \frac{dL}{dx} = -s\, k\, (1 - p_t)^\gamma \bigl(\gamma\, p_t\, \ell + (1 - p_t)\bigr)

    (:math:`dp_t/dz = p_t (1 - p_t)`, :math:`d\ell/dz = -(1 - p_t)`). No term is singular, for
    any :math:`\gamma \ge 0`. This takes one sigmoid and one log per element instead of the
    general path's two sigmoids and two softplus, at the price of absolute rather than relative
    accuracy (about fp32 epsilon, like ``sigmoid(x) - t`` in PyTorch's own BCE gradient) for
    elements whose :math:`p_t` rounds to 1; :math:`\ell` stays exact as :math:`p_t \to 0`.
    """
    acc = x.dtype
    shape = x.shape
    n = x.numel()
    if scratch is None or scratch.shape[1] < n:
        scratch = torch.empty((HARD_SCRATCH_ROWS, n), dtype=acc, device=x.device)
    # Block-sized work buffers, reused across blocks by the caller: every op below writes into
    # one of them (on the CPU a fresh block-sized allocation costs more than the arithmetic).
    Z, P, L, Q, KL, KG, LO = (scratch[k, :n].view(shape) for k in range(HARD_SCRATCH_ROWS))

    # z = s x = (2t - 1) x, as a product with s = +-1 (x - 2 x t would be nan at x = +-inf)
    torch.mul(t, 2.0, out=Z).sub_(1.0).mul_(x)
    torch.sigmoid(Z, out=P)  # p_t
    # log p_t; sigmoid underflows to 0 for z < -88 (fp32), where log p_t = z - log1p(e^z) ~ z:
    # min(log(max(p_t, tiny)), z) is log p_t everywhere, since log p_t < z always.
    torch.clamp_min(P, torch.finfo(acc).tiny, out=L).log_()
    torch.minimum(L, Z, out=L)  # L = log p_t = -ell (the sign is folded into the constants)
    torch.neg(P, out=Q).add_(1.0)  # 1 - p_t
    gamma = opts.gamma_pos
    factor: Tensor | None = None  # (1 - p_t)^gamma, in Z (free from here on)
    if gamma == 2.0:
        factor = torch.mul(Q, Q, out=Z)
    elif gamma in (1.0, 3.0, 0.5):
        factor = torch.pow(Q, gamma, out=Z)  # special-cased in torch: multiplies or a sqrt
    elif gamma != 0.0:
        # exp(gamma log(1 - p_t)); log(0) = -inf gives exactly 0 (gamma > 0 here)
        factor = torch.log(Q, out=Z).mul_(gamma).exp_()

    # Constant multipliers: -k = -w alpha_t pw_t for the loss (L holds -ell), and
    # -scale s k for the gradient; with s^2 = 1, s alpha_t = s/2 + alpha - 1/2 = t + alpha - 1.
    a = opts.alpha
    extra: Tensor | None = None  # w pw_t
    if pos_weight is not None:
        extra = torch.addcmul(torch.ones_like(t), t, pos_weight - 1.0)  # pw on positives, else 1
    if weight is not None:
        extra = weight if extra is None else extra.mul_(weight)
    k_loss: Tensor | float
    if a is None:
        k_loss = -1.0 if extra is None else torch.neg(extra, out=KL)
    else:
        k_loss = torch.mul(t, 1.0 - 2.0 * a, out=KL).add_(a - 1.0)  # -alpha_t
        if extra is not None:
            k_loss.mul_(extra)

    loss = L if factor is None else torch.mul(L, factor, out=LO)
    loss = torch.mul(loss, k_loss, out=LO)
    if grad_out is None:
        return loss
    if isinstance(grad_scale, Tensor) and x.device.type == "cpu" and not _compiling():
        grad_scale = float(grad_scale)  # a Python scalar keeps the ops below on their fast path
    neg_scale = -grad_scale
    if a is None:
        k_grad = torch.mul(t, 2.0 * neg_scale, out=KG).sub_(neg_scale)  # -scale s
    else:
        k_grad = torch.add(t, a - 1.0, out=KG).mul_(neg_scale)  # -scale s alpha_t
    if extra is not None:
        k_grad.mul_(extra)
    # dL/dx = -s k F (gamma p_t ell + 1 - p_t), with ell = -L
    # (detach_focal_weight: F is a constant, only the -s k F (1 - p_t) of d ell/dx remains)
    detached = gamma == 0.0 or opts.detach_focal_weight
    gz = Q if detached else torch.addcmul(Q, P, L, value=-gamma, out=P)
    if factor is not None:
        gz.mul_(factor)
    if grad_out.dtype == acc:
        torch.mul(gz, k_grad, out=grad_out)
    else:
        grad_out.copy_(gz.mul_(k_grad))
    return loss


def binary_cross_entropy(call: BinaryCall) -> tuple[Tensor, Tensor | None]:
    """Loss (reduced per ``reduction``) and its gradient w.r.t. ``logits`` (or None).

    Args:
        logits: float tensor of any shape.
        target: tensor of the logits' shape (float in [0, 1], int or bool; validated upstream).
        weight, pos_weight: tensors that broadcast to the logits' shape, in the accumulation
            dtype on the logits' device (validated upstream), or None.
        opts, reduction: validated options.
        need_grad: compute the gradient.

    Returns:
        ``(loss, grad)``: the loss in fp32 (fp64 for fp64 logits), of the logits' shape for
        ``reduction="none"``; the gradient of that (summed) loss in the logits' dtype and
        shape, the only logits-sized allocation besides a "none" loss.
    """
    logits, target, weight, pos_weight = call.logits, call.target, call.weight, call.pos_weight
    opts, reduction, need_grad = call.opts, call.reduction, call.need_grad
    acc = _acc_dtype(logits.dtype)
    shape = tuple(logits.shape)
    dev = logits.device
    if _compiling() or dev.type != "cpu":
        blocks: list[tuple[int | slice, ...]] = [()]
    else:
        blocks = list(_blocks(shape, BLOCK_ELEMENTS))
    w = weight.expand(shape) if weight is not None else None  # views: indexed per block
    pw = pos_weight.expand(shape) if pos_weight is not None else None

    scale: Tensor | float = 1.0
    if reduction == "mean":
        if opts.ignore_index is None:
            n = logits.numel()
            scale = torch.tensor(1.0 / n if n else 0.0, dtype=acc, device=dev)
        else:
            count = sum((target[i] != opts.ignore_index).sum() for i in blocks)
            count = torch.as_tensor(count, device=dev).to(acc)
            # Every entry masked (or empty): 0 with a zero gradient instead of 0/0 = nan.
            scale = inverse_or_zero(count)

    grad_buf = None
    # fresh CPU memory: ask for huge pages (see _memory.empty_hugepage)
    use_huge = dev.type == "cpu" and not torch.compiler.is_compiling()
    if need_grad:
        grad_buf = empty_hugepage(*shape, dtype=logits.dtype) if use_huge else torch.empty(
            shape, dtype=logits.dtype, device=dev
        )
    scratch = None
    if _hard_path_applies(opts) and len(blocks) > 1:
        size = max(logits[i].numel() for i in blocks[:2])  # the first block is a full one
        scratch = (
            empty_hugepage(HARD_SCRATCH_ROWS, size, dtype=acc)
            if use_huge
            else torch.empty((HARD_SCRATCH_ROWS, size), dtype=acc, device=dev)
        )
    out = torch.empty(shape, dtype=acc, device=dev) if reduction == "none" else None
    sums = []
    for i in blocks:
        lb = binary_elements(
            logits[i],
            target[i],
            None if w is None else w[i],
            None if pw is None else pw[i],
            opts,
            None if grad_buf is None else grad_buf[i],
            scale,
            scratch,
        )
        if out is not None:
            out[i] = lb
        else:
            sums.append(lb.sum())

    if out is not None:
        loss = out
    else:
        total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
        loss = total * scale if reduction == "mean" else total
    return loss, grad_buf
