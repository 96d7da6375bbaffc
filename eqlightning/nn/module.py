"""Base class of eqlightning's tensor-native equivariant layers.

Every layer takes and returns plain ``torch.Tensor`` s of shape ``(N, C, H, W)``; the channels are the
concatenated fields of its ``in_type`` / ``out_type`` (escnn ``FieldType`` s, kept as picklable recipes). A layer
``f`` is equivariant when ``f(rho_in(g) x) = rho_out(g) f(x)`` for every group element ``g``, where ``rho`` acts on
both the fibre (the channels of each field) and the plane (rotating/flipping the pixel grid).
"""

from __future__ import annotations

import torch
from torch import nn

from .fields import FieldTypeRecipe, as_recipe


class EquivariantModule(nn.Module):
    """A layer mapping tensors of ``in_type`` fields to tensors of ``out_type`` fields."""

    def __init__(self, in_type, out_type=None):
        super().__init__()
        self._in_recipe: FieldTypeRecipe = as_recipe(in_type)
        self._out_recipe: FieldTypeRecipe = as_recipe(in_type if out_type is None else out_type)

    @property
    def in_type(self):
        """The escnn ``FieldType`` of the input."""
        return self._in_recipe.build()

    @property
    def out_type(self):
        """The escnn ``FieldType`` of the output."""
        return self._out_recipe.build()

    @property
    def dims(self) -> int:
        """Spatial dimensions of the tensors: 2 (``(N, C, H, W)`` images) or 3 (``(N, C, D, H, W)`` volumes)."""
        return self._in_recipe.dims

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 + self.dims or x.shape[1] != self._in_recipe.size:
            spatial = "H, W" if self.dims == 2 else "D, H, W"
            raise ValueError(
                f"{type(self).__name__} expects a (N, {self._in_recipe.size}, {spatial}) tensor for its "
                f"{len(self._in_recipe.reprs)} input fields, got shape {tuple(x.shape)}"
            )

    def export(self) -> nn.Module:
        """An equivalent module built from plain torch layers only (no escnn types), for inference."""
        raise NotImplementedError(f"{type(self).__name__} does not implement export()")

    @torch.no_grad()
    def check_equivariance(self, x: torch.Tensor | None = None, elements=None, spatial: int = 9) -> list:
        """Apply escnn's group action to input and output; returns ``[(element, max_abs_error), ...]``.

        By default the elements are the group's ``testing_elements`` (in 3D: the elements that map the voxel grid onto
        itself); elements that do not map the grid onto itself (e.g. 45 degrees in C8, or a generic rotation in SO3)
        are only exact at 1x1(x1) spatial size, so pass ``spatial=1`` for those (3D: the action is applied exactly
        only for grid elements and at size 1).
        """
        from ._escnn import enn
        from .fields import grid_elements
        from .groups3d import transform_fields

        in_type, out_type = self.in_type, self.out_type
        if in_type.gspace != out_type.gspace:  # a restriction: view the input as fields of the subgroup
            in_type = out_type
        if x is None:
            x = torch.randn(3, in_type.size, *(spatial,) * self.dims)
        if elements is None:
            elements = list(in_type.testing_elements) if self.dims == 2 else grid_elements(in_type.gspace)
        y = self(x)
        errors = []
        for g in elements:
            if self.dims == 3:  # escnn interpolates 3D rotations (scipy, needs its sample data): act exactly instead
                gx, gy = transform_fields(x, in_type, g), transform_fields(y, out_type, g)
            else:
                gx = enn.GeometricTensor(x, in_type).transform(g).tensor
                gy = enn.GeometricTensor(y, out_type).transform(g).tensor
            errors.append((g, (self(gx) - gy).abs().max().item()))
        return errors
