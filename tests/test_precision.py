"""Mixed precision (bf16-mixed, 16-mixed) for every registered backbone, with and without DP-SGD, on CPU.

Under autocast the convolutions run in low precision while the equivariant filter expansion and the per-sample
gradient rules run in fp32 (the master weights stay fp32), so training moves the weights, keeps them finite and
keeps the equivariant backbones exactly invariant.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from small_backbones import ALL, small_backbone, small_options3d
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from eqlightning.models import backbone_entry, create_backbone
from eqlightning.nn import image_symmetries, volume_symmetries


class Zoo(L.LightningModule):
    """One backbone trained on a fixed random batch of 32 images."""

    def __init__(self, name: str):
        super().__init__()
        self.dims = backbone_entry(name).dims
        if self.dims == 3:  # volumes: 8^3 keeps the 3D zoo fast
            self.backbone = create_backbone(name, in_channels=1, num_classes=2, input_size=8, **small_options3d(name))
        else:
            self.backbone = small_backbone(name)
        g = torch.Generator().manual_seed(0)
        shape = (32, 1, 8, 8, 8) if self.dims == 3 else (32, 1, 28, 28)
        self.data = TensorDataset(torch.randn(*shape, generator=g), torch.randint(0, 2, (32,), generator=g))
        self.losses: list[torch.Tensor] = []
        self.logit_dtypes: set = set()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.backbone(x)
        self.logit_dtypes.add(logits.dtype)
        loss = F.cross_entropy(logits.float(), y)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True)


@pytest.mark.parametrize("private", [False, True], ids=["nonprivate", "dp"])
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", [*ALL, "eq_resnet8_3d", "resnet18_3d"])
def test_mixed_precision_trains_every_backbone(name, precision, private, tmp_path):
    L.seed_everything(0)
    model = Zoo(name)
    before = [p.detach().clone() for p in model.parameters()]
    callbacks = []
    if private:
        from eqlightning.privacy import DifferentialPrivacy
        callbacks.append(DifferentialPrivacy(noise_multiplier=0.5, accountant="rdp", seed=0))
    # Lightning turns 16-mixed on CPU into bf16-mixed; the plugin forces real fp16 with a GradScaler, as on a GPU
    amp = {"precision": precision} if precision == "bf16-mixed" else \
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))]}
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=callbacks, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), **amp)
    trainer.fit(model)

    low = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    assert low in model.logit_dtypes and model.logit_dtypes <= {low, torch.float32}  # autocast was active
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler.get_scale() > 1  # the loss was scaled (and unscaled for clipping)
    assert all(torch.isfinite(loss) for loss in model.losses), model.losses
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()  # fp32 master weights
    assert max((p - b).abs().max().item() for p, b in zip(model.parameters(), before)) > 1e-4
    if private:
        assert callbacks[0].ledger.steps >= 2 and callbacks[0].epsilon > 0
    entry = backbone_entry(name)
    if entry.equivariant:  # training in low precision kept the weights exactly equivariant
        net = model.backbone.eval()
        x = model.data.tensors[0][:3]
        symmetries = volume_symmetries(net.group) if model.dims == 3 else image_symmetries(net.group)
        with torch.no_grad():
            y = net(x)
            for element, transform in symmetries.items():
                assert (net(transform(x)) - y).abs().max().item() <= 1e-4, element
