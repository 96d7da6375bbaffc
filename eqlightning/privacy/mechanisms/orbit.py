"""Per-sample coefficient gradients of an equivariant convolution through the orbits of its basis.

Every basis filter ``B_d`` is itself equivariant, so for each element ``h`` of a subgroup ``H`` that maps the pixel
grid onto itself (all of C4/D4, the rot90 part of C8/D8):

    B[d, P_h o, Q_h i, T_h s] = B[d, o, i, s]

(``P_h``, ``Q_h`` the channel permutations of the output/input fields, ``T_h`` the rotation/flip of a kernel offset).
The coefficient gradient ``c[d] = sum_{o,i,s} B[d,o,i,s] G[o,i,s]`` therefore only needs the sums of the filter
gradient ``G`` over orbits ``{(P_h o, Q_h i, T_h s)}``: |H| times fewer numbers. With ``G[o,i,s] = sum_p g[o,p]
x[i,p+s]`` and the substitution ``p = T_h q``, each orbit sum is a correlation of rotated copies of the output
gradient with rotated copies of the input:

    orbit[o', i', s'] = sum_{h, q}  g[P_h o', T_h q] * x[Q_h i', T_h (q + s')]

one matmul per sample with inner dimension |H| * pixels instead of pixels. That is what makes the per-sample
gradients of the small, wide feature maps of the last stages affordable. Used for stride-1 "same" convolutions
on square maps whose input fields are permuted freely by ``H``; the plan is verified against the basis numerically
when it is built, and anything else uses the generic path.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from ...nn import EquivariantConv2d
from ...nn.basis import grid_map

#: plans per (shared, per-process) basis and map size; they die with the basis
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class OrbitPlan:
    """Gather indices and the reduced basis for one layer (a single block) at one square map size."""

    def __init__(self, layer: EquivariantConv2d, size: int):
        (block,) = layer.basis.blocks
        self.valid = False
        if not block.symmetries:
            return
        perms = block.symmetries  # [(P_out, P_in, kernel map, matrix)], exact symmetries of the basis
        i_size, o_size = block.in_group.recipe.size, block.out_group.recipe.size
        orbits = {}
        for i in range(i_size):  # representatives of the input indices; H must permute them freely
            orbits.setdefault(frozenset(int(p_i[i]) for _, p_i, _, _ in perms), i)
        if any(len(o) != len(perms) for o in orbits):
            return
        reps = np.array(sorted(orbits.values()))
        a, b, h, k = block.out_group.count, block.in_group.count, len(perms), layer.kernel_size
        pixels = np.stack([grid_map(size, m) for _, _, _, m in perms])  # (h, L)
        area = size * size
        # g_hat[n, a, o', h, q] = gy[n, (a, P_h o'), T_h q]; x_hat[n, b, i', h, r] = x[n, (b, P_h i'), T_h r]
        out_ch = np.arange(a)[:, None, None] * o_size + np.stack([p_o for p_o, _, _, _ in perms], 1)[None]
        in_ch = np.arange(b)[:, None, None] * i_size + np.stack([p_i[reps] for _, p_i, _, _ in perms], 1)[None]
        self.g_index = torch.from_numpy((out_ch[..., None] * area + pixels[None, None]).reshape(-1))
        self.x_index = torch.from_numpy((in_ch[..., None] * area + pixels[None, None]).reshape(-1))
        reduced = block.basis.reshape(block.dim, o_size, i_size, k * k)[:, :, torch.as_tensor(reps)]
        self.reduced = reduced.reshape(block.dim, -1).contiguous()  # (d, o * R * k*k)
        self.shape = (a, o_size, b, len(reps), k, h, block.dim)
        self._device_cache: dict = {}
        self.valid = True

    def _tensors(self, device, dtype):
        key = (torch.device(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = (self.g_index.to(device), self.x_index.to(device),
                                       self.reduced.to(device, dtype))
        return self._device_cache[key]

    def coefficient_grads(self, layer: EquivariantConv2d, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """``(N, dim)`` per-sample coefficient gradients (escnn's coefficient order)."""
        a, o, b, r, k, h, d = self.shape
        n, size = x.shape[0], x.shape[-1]
        g_index, x_index, reduced = self._tensors(x.device, x.dtype)
        g_hat = gy.reshape(n, -1).index_select(1, g_index).view(n, a * o, h * size * size)
        x_hat = x.reshape(n, -1).index_select(1, x_index).view(n, b * r, h, size, size)
        pad = layer.padding
        windows = F.pad(x_hat, (pad, pad, pad, pad)).unfold(3, k, 1).unfold(4, k, 1)  # (N, bR, h, S, S, k, k)
        patches = windows.permute(0, 1, 5, 6, 2, 3, 4).reshape(n, b * r * k * k, h * size * size)
        orbit = torch.bmm(g_hat, patches.transpose(1, 2))  # (N, a*o, b*R*k*k): sums over the orbits
        orbit = orbit.view(n, a, o, b, r * k * k).transpose(2, 3).reshape(n * a * b, o * r * k * k)
        return (orbit @ reduced.T).view(n, a * b * d)


def orbit_plan(layer: EquivariantConv2d, x: torch.Tensor) -> OrbitPlan | None:
    """The plan for this layer and input, or None when the orbit path does not apply."""
    basis = layer.basis
    size = x.shape[-1]
    if (layer.stride != 1 or layer.dilation != 1 or layer.padding != (layer.kernel_size - 1) // 2
            or x.shape[-2] != size or len(basis.blocks) != 1 or not basis.channels_grouped):
        return None
    plans = _PLANS.setdefault(basis, {})
    if size not in plans:
        plan = OrbitPlan(layer, size)
        plans[size] = plan if plan.valid else None
    return plans[size]
