"""BatchAugment: each output is a D4 element / translation of its input, seeded, per sample, train-only."""

from __future__ import annotations

import gc

import pytest
import torch

from eqlightning.data import BatchAugment, MedMNISTDataModule


def d4(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images rot90^k(img) and rot90^k(flip(img))."""
    return [torch.rot90(im, k, dims=(-2, -1)) for im in (img, img.flip(-1)) for k in range(4)]


def crops(img: torch.Tensor, p: int, fill: float) -> list[torch.Tensor]:
    """Every H x W window of img padded by p with fill."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (p, p, p, p), value=fill)
    return [padded[..., i:i + h, j:j + w] for i in range(2 * p + 1) for j in range(2 * p + 1)]


def which(candidates: list[torch.Tensor], out: torch.Tensor) -> int:
    matches = [i for i, c in enumerate(candidates) if torch.equal(c, out)]
    assert matches, "augmented image is not a valid transform of the original"
    return matches[0]


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(64, 3, 12, 12, generator=torch.Generator().manual_seed(0))  # generic: all 8 D4 images differ


def test_rot90_flip_give_every_d4_element(batch):
    out = BatchAugment(rot90=True, flip=True)(batch, generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    used = [which(d4(x), y) for x, y in zip(batch, out)]
    assert set(used) == set(range(8))  # 64 draws: all 8 elements show up, so samples get different transforms


def test_rot90_only_and_flip_only(batch):
    g = torch.Generator().manual_seed(2)
    assert {which(d4(x), y) for x, y in zip(batch, BatchAugment(rot90=True)(batch, g))} == {0, 1, 2, 3}
    assert {which(d4(x), y) for x, y in zip(batch, BatchAugment(flip=True)(batch, g))} == {0, 4}


def test_crop(batch):
    p = 2
    out = BatchAugment(crop_padding=p, fill=-1.0)(batch, generator=torch.Generator().manual_seed(3))
    used = [which(crops(x, p, -1.0), y) for x, y in zip(batch, out)]
    assert len(set(used)) > 10  # different shifts for different samples
    assert (out == -1.0).any()  # black borders came in


def test_all_three(batch):
    p = 1
    out = BatchAugment(rot90=True, flip=True, crop_padding=p)(batch, generator=torch.Generator().manual_seed(4))
    for x, y in zip(batch, out):
        assert any(torch.equal(c, y) for r in d4(x) for c in crops(r, p, 0.0))


def test_seeded_and_input_untouched(batch):
    aug = BatchAugment(rot90=True, flip=True, crop_padding=3)
    original = batch.clone()
    a = aug(batch, generator=torch.Generator().manual_seed(5))
    b = aug(batch, generator=torch.Generator().manual_seed(5))
    c = aug(batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(batch, original)


def test_edge_cases():
    assert not BatchAugment().enabled
    empty = torch.zeros(0, 1, 8, 8)
    assert BatchAugment(rot90=True, crop_padding=2)(empty).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="square"):
        BatchAugment(rot90=True)(torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchAugment(flip=True)(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="crop_padding"):
        BatchAugment(crop_padding=-1)
    assert "rot90=True" in repr(BatchAugment(rot90=True))


def test_uint8_and_large_batch():
    x = torch.randint(0, 256, (4096, 1, 28, 28), dtype=torch.uint8)
    out = BatchAugment(rot90=True, flip=True, crop_padding=4)(x, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape


# -------------------------------------------------------------------------------------- through the data module
@pytest.fixture
def breast(medmnist_root):
    def make(**kwargs) -> MedMNISTDataModule:
        dm = MedMNISTDataModule(root=str(medmnist_root), download=False, batch_size=32, **kwargs)
        dm.setup()
        return dm
    return make


def test_train_batches_are_augmented_eval_batches_are_not(breast):
    dm = breast(rot90=True, flip=True, crop_padding=2)
    assert isinstance(dm.augment, BatchAugment) and dm.augment.fill == -1.0  # pads with black
    plain = breast()
    assert plain.augment is None
    # same seed -> same shuffled order, so the augmented batch is a transform of the plain one, sample by sample
    x_aug, y_aug = next(iter(dm.train_dataloader()))
    x, y = next(iter(plain.train_dataloader()))
    assert torch.equal(y, y_aug) and not torch.equal(x, x_aug)
    for a, b in zip(x, x_aug):
        assert any(torch.equal(c, b) for r in d4(a) for c in crops(r, 2, -1.0))
    for loader in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        got = torch.cat([b for b, _ in getattr(dm, loader)()])
        assert torch.equal(got, torch.cat([b for b, _ in getattr(plain, loader)()]))


def test_augmentation_is_seeded_and_changes_per_epoch(breast):
    first = breast(rot90=True, flip=True)
    loader = first.train_dataloader()
    epoch1, epoch2 = next(iter(loader))[0], next(iter(loader))[0]
    again = next(iter(breast(rot90=True, flip=True).train_dataloader()))[0]
    other = next(iter(breast(rot90=True, flip=True, seed=1).train_dataloader()))[0]
    assert torch.equal(epoch1, again)  # reproducible for a seed
    assert not torch.equal(epoch1, other)
    assert not torch.equal(epoch1, epoch2)  # the shuffle and the draws move on between epochs


def test_augmentation_in_worker_processes(breast):
    """Workers seed their own generator from the loader's seed: reproducible across runs."""
    runs = []
    for _ in range(2):
        loader = breast(rot90=True, flip=True, num_workers=2).train_dataloader()
        runs.append([x for x, _ in loader][:4])
        del loader  # stop the workers now (see test_data_real.test_worker_processes)
        gc.collect()
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    plain = [x for x, _ in breast(num_workers=0).train_dataloader()][:4]
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], plain))


def test_each_worker_gets_its_own_generator(monkeypatch):
    from types import SimpleNamespace

    import eqlightning.data.medmnist as medmnist
    collate = medmnist._Collate(BatchAugment(rot90=True), seed=0)
    draws = {}
    for worker, seed in ((0, 1000), (1, 1001), (0, 1000)):
        monkeypatch.setattr(medmnist, "get_worker_info", lambda: SimpleNamespace(id=worker, seed=seed))
        collate._generator = None  # as in a freshly started worker process (pickling drops it, too)
        draws.setdefault(worker, []).append(torch.randint(0, 4, (16,), generator=collate.generator()))
    assert torch.equal(draws[0][0], draws[0][1])  # same worker seed -> same stream
    assert not torch.equal(draws[0][0], draws[1][0])  # workers differ
    import pickle
    assert pickle.loads(pickle.dumps(collate))._generator is None
