r"""HiPA's training objective: a high-frequency-promoting loss term for low-rank adaptors.

HiPA (arXiv:2311.18158) trains LoRA adaptors of a frozen diffusion model so that its *one-step* output
matches the multi-step output, with an adaptation loss made of a spatial perceptual term and a
*high-frequency promoted* term built from Fourier components and edge information: one-step samples lack
high-frequency detail, so the objective weighs exactly that part of the error.  The adaptor is an ordinary
LoRA (:class:`~lowrank_theory.adapters.lowrank.LoRA`); what is new is the loss, so it lives here as a
training rule: any model output (an image, a feature map, or -- for theory -- a weight update ΔW) of shape
``(..., H, W)`` can be compared with its target.

Definitions (x, y real, shape (..., H, W), :math:`N = HW`; :math:`\mathcal F` the unnormalized 2-D DFT over
the last two axes, ``torch.fft.fft2``):

* radial frequency of bin :math:`(k, l)`: :math:`\rho_{kl} = \sqrt{f_k^2 + g_l^2}` with :math:`f_k, g_l`
  the signed frequencies in cycles per sample (``torch.fft.fftfreq``), so :math:`0 \le \rho \le 1/\sqrt 2`;
* high-pass mask :math:`M_{kl} = [\rho_{kl} > c]` for a cutoff :math:`c \in [0, 1/\sqrt2)`;
  :math:`M` is symmetric under :math:`(k, l) \mapsto (-k, -l)`, so
  :math:`H_c x = \mathcal F^{-1}(M \odot \mathcal F x)` is real;
* ``norm="l2"``: :math:`L_{hf}(x, y) = \frac{1}{N}\,\lVert M \odot \mathcal F(x-y)\rVert^2 / N` per image,
  averaged over the leading axes -- computed in the frequency domain; it equals the spatial mean square
  :math:`\frac1N\lVert H_c(x-y)\rVert^2 = \frac1N (x-y)^\top P_c (x-y)` with :math:`P_c` an orthogonal
  projector (Parseval; ``proofs/20-hipa-parseval.md``);
* ``norm="l1"``: :math:`\frac1N \lVert H_c(x-y)\rVert_1` (spatial; no Parseval identity for it);
* edge term: :math:`L_{edge} = \frac{1}{2N}\lVert S_h(x-y)\rVert_1 + \frac{1}{2N}\lVert S_v(x-y)\rVert_1`
  with the 3×3 Sobel operators applied with zero padding ("edge information" of the paper).

:func:`hipa_loss` combines them with a spatial term (mean squared error by default; the paper's spatial
term is a perceptual loss such as LPIPS, which needs a pretrained network: pass it as ``spatial``).

What we read: the arXiv abstract (one-step low-rank adaptors trained to enhance the under-represented high
frequencies), and two third-party summaries of the paper (sciencestack.ai/paper/2311.18158: "a spatial
perceptual loss with a high-frequency loss derived from Fourier components and edge information";
mlhb.ninja/2311.18158: "an adaptation loss that combines a spatial perceptual loss and a high-frequency
promoted loss").  The paper body and code (announced, not found) were not read, so the filter shape (a hard
radial high-pass), the cutoff, the distance (L2 / L1) and the Sobel edge operator are our choices, stated
here; the paper's exact weights are unknown.

References
----------
Y. Zhang, B. Hooi, "HiPA: Enabling One-Step Text-to-Image Diffusion Models via High-Frequency-Promoting
Adaptation", arXiv:2311.18158.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["edge_loss", "high_frequency_loss", "high_pass", "high_pass_mask", "hipa_loss", "sobel_edges"]

#: Largest radial frequency of a 2-D grid: a corner bin at (1/2, 1/2) cycles per sample.
MAX_RADIUS = 1 / math.sqrt(2)
NORMS = ("l2", "l1")


# ============================================================================ validation
def _check_cutoff(cutoff: float) -> float:
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | float) or not math.isfinite(cutoff):
        raise TypeError(f"cutoff must be a finite real number, got {cutoff!r}")
    if not 0.0 <= cutoff < MAX_RADIUS:
        raise ValueError(f"cutoff must satisfy 0 <= cutoff < 1/sqrt(2) (cycles per sample), got {cutoff}")
    return float(cutoff)


def _check_image(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating tensor, got dtype {x.dtype}")
    if x.ndim < 2 or x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"{name} must have shape (..., H, W) with H, W >= 1, got {tuple(x.shape)}")
    return x


def _fft_dtype(x: torch.Tensor) -> torch.Tensor:
    """x itself, or x in float32 for half precision (torch's FFTs take float32/float64 only on CPU)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    _check_image(pred, "pred")
    _check_image(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")


def _check_weight(v: float, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


# ============================================================================ filters
def high_pass_mask(height: int, width: int, cutoff: float, *, device: torch.device | str | None = None) -> torch.Tensor:
    r"""The boolean high-pass mask :math:`M_{kl} = [\rho_{kl} > c]` (height, width), in ``fft2``'s bin order.

    Parameters
    ----------
    height, width : int
        H, W >= 1.
    cutoff : float
        c in cycles per sample, :math:`0 \le c < 1/\sqrt 2`; c = 0 keeps every bin but the mean (DC).

    Notes
    -----
    :math:`\rho` depends on :math:`|f_k|, |g_l|` only and the bin :math:`-k \bmod H` has frequency
    :math:`-f_k` (the Nyquist bin of an even size is its own mirror), so :math:`M` is symmetric under
    :math:`(k,l)\mapsto(-k,-l)`: the filtered signal of a real input is real.
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    c = _check_cutoff(cutoff)
    f = torch.fft.fftfreq(height, device=device, dtype=torch.float64)
    g = torch.fft.fftfreq(width, device=device, dtype=torch.float64)
    rho = torch.sqrt(f[:, None] ** 2 + g[None, :] ** 2)
    return rho > c


def high_pass(x: torch.Tensor, cutoff: float = 0.25) -> torch.Tensor:
    r""":math:`H_c x = \mathcal F^{-1}(M \odot \mathcal F x)` over the last two axes; real, same shape and dtype."""
    _check_image(x, "x")
    M = high_pass_mask(x.shape[-2], x.shape[-1], cutoff, device=x.device)
    return torch.fft.ifft2(torch.fft.fft2(_fft_dtype(x)) * M).real.to(x.dtype)


_SOBEL_H = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Horizontal and vertical Sobel responses of ``x`` (..., H, W), zero padding, each of x's shape.

    :math:`S_h x = K_h \star x`, :math:`K_h = [[-1,0,1],[-2,0,2],[-1,0,1]]` (cross-correlation, as
    ``conv2d``), :math:`S_v` with :math:`K_v = K_h^\top`.
    """
    _check_image(x, "x")
    lead, (H, W) = x.shape[:-2], x.shape[-2:]
    k = torch.tensor(_SOBEL_H, dtype=x.dtype, device=x.device)
    kernels = torch.stack([k, k.T])[:, None]  # (2, 1, 3, 3)
    out = F.conv2d(x.reshape(-1, 1, H, W), kernels, padding=1)
    out = out.reshape(*lead, 2, H, W)
    return out[..., 0, :, :], out[..., 1, :, :]


# ============================================================================ losses
def high_frequency_loss(pred: torch.Tensor, target: torch.Tensor, *, cutoff: float = 0.25,
                        norm: str = "l2") -> torch.Tensor:
    r"""HiPA's high-frequency term: the error of ``pred`` against ``target`` above the cutoff (a 0-d tensor).

    Parameters
    ----------
    pred, target : torch.Tensor
        Real, same shape (..., H, W) (e.g. (batch, channels, H, W) images or feature maps).
    cutoff : float, default 0.25
        c in cycles per sample (:func:`high_pass_mask`).
    norm : {"l2", "l1"}
        ``"l2"``: :math:`\frac{1}{N^2}\lVert M\odot\mathcal F(x-y)\rVert^2` per image (= spatial mean square of
        :math:`H_c(x-y)`), computed from the spectrum; ``"l1"``: spatial mean of :math:`|H_c(x-y)|`.
        Both averaged over the leading axes.  Half-precision inputs are transformed in float32 (the result is
        returned in the input's dtype).

    Raises
    ------
    TypeError, ValueError
        Non-tensor or non-real input, shapes that differ or lack two trailing axes, a cutoff outside
        :math:`[0, 1/\sqrt 2)`, an unknown ``norm``.
    """
    _check_pair(pred, target)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    H, W = pred.shape[-2:]
    M = high_pass_mask(H, W, cutoff, device=pred.device)
    D = torch.fft.fft2(_fft_dtype(pred - target))
    if norm == "l2":
        energy = (D.abs().square() * M).sum(dim=(-2, -1))
        return (energy / (H * W) ** 2).mean().to(pred.dtype)
    hp = torch.fft.ifft2(D * M).real
    return hp.abs().mean().to(pred.dtype)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean absolute Sobel response of the error, averaged over both directions (a 0-d tensor)."""
    _check_pair(pred, target)
    sh, sv = sobel_edges(pred - target)
    return 0.5 * (sh.abs().mean() + sv.abs().mean())


def hipa_loss(pred: torch.Tensor, target: torch.Tensor, *, hf_weight: float = 1.0, edge_weight: float = 0.0,
              cutoff: float = 0.25, norm: str = "l2",
              spatial: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    r"""HiPA's adaptation loss :math:`L_{sp} + \lambda_{hf} L_{hf} + \lambda_{edge} L_{edge}` (a 0-d tensor).

    Parameters
    ----------
    pred, target : torch.Tensor
        Real, same shape (..., H, W): the adapted one-step output and its target (the multi-step output).
    hf_weight, edge_weight : float
        :math:`\lambda_{hf}, \lambda_{edge} \ge 0`.
    cutoff, norm
        Of :func:`high_frequency_loss`.
    spatial : callable, optional
        :math:`L_{sp}(pred, target)`; default the mean squared error (the paper uses a perceptual loss).

    Raises
    ------
    TypeError, ValueError
        As :func:`high_frequency_loss`; negative or non-finite weights; ``spatial`` not callable.
    """
    _check_pair(pred, target)
    hf_weight, edge_weight = _check_weight(hf_weight, "hf_weight"), _check_weight(edge_weight, "edge_weight")
    if spatial is not None and not callable(spatial):
        raise TypeError(f"spatial must be a callable (pred, target) -> loss, got {type(spatial).__name__}")
    _check_cutoff(cutoff)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    loss = F.mse_loss(pred, target) if spatial is None else spatial(pred, target)
    if hf_weight:
        loss = loss + hf_weight * high_frequency_loss(pred, target, cutoff=cutoff, norm=norm)
    if edge_weight:
        loss = loss + edge_weight * edge_loss(pred, target)
    return loss
