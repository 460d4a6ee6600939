"""A dataset in the PASCAL VOC folder layout, with image-level labels for weak supervision.

Layout::

    ROOT/JPEGImages/<id>.jpg (or any extension of layout.IMAGE_EXTENSIONS, any letter case)
    ROOT/SegmentationClass/<id>.png       palette PNG, pixel = class index, 255 = ignore (optional)
    ROOT/ImageSets/Segmentation/<split>.txt
    ROOT/classes.txt
    ROOT/labels.json | ROOT/labels.csv    image-level labels, used when there are no masks

Image-level labels come from the masks (the classes present) when the dataset has them, and are then
recomputed after the transform, so a crop is labelled with the classes inside the crop. Without masks they
come from a labels file (an explicit ``labels_file`` is used even when masks exist; the masks then only
serve as ground truth).

Your own images need no VOC layout: a folder of images (any sub-folders, any extension of
``layout.IMAGE_EXTENSIONS``) with ``labels.csv`` or ``labels.json`` at its root (keys: paths below the root, with or
without extension) is a dataset whose one split is every labelled image (split ``None`` or ``"all"``). Its classes
are ``ROOT/classes.txt`` if there is one, else the class list the model was trained on (``class_names``), else the
names in the labels file, sorted, after a ``background`` class unless ``background=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import UnidentifiedImageError

from ..errors import ConfigError, DataError
from .classes import ClassSet
from .io import IGNORE_INDEX, open_image, read_image, read_mask, read_palette
from .layout import (ALL_IMAGES, LABEL_FILE_NAMES, ImageFolder, find_labels_file, image_folder_classes,
                     is_image_folder_dataset, read_labels_file, read_split)
from .transforms import mask_to_tensor, to_tensor

SALIENCY_BIT = 256  # saliency travels through the transforms packed above the mask's 0..255 labels
ROI_BIT = 512  # so does "inside the image": padding (mask 255) decodes as outside, the crop's ROI

Transform = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def labels_from_mask(
    mask: torch.Tensor | np.ndarray, classes: ClassSet, min_fraction: float = 0.0
) -> np.ndarray:
    """Multi-hot float32 ``(num_fg,)`` of the foreground classes present in ``mask``, in classifier-output order.

    With ``min_fraction`` > 0 a class counts only if it covers at least that fraction of the labelled
    (non-255) pixels. Background and 255 never count.
    """
    values = (mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)).reshape(-1)
    counts = np.bincount(values, minlength=IGNORE_INDEX + 1)  # masks hold 0..255 only
    labelled = int(counts.sum() - counts[IGNORE_INDEX])
    counts = counts[: classes.num_classes]
    fg_counts = counts[classes.fg_labels]
    if min_fraction > 0:
        present = fg_counts >= min_fraction * max(labelled, 1)
        present &= fg_counts > 0
    else:
        present = fg_counts > 0
    return present.astype(np.float32)



class VOCDataset(torch.utils.data.Dataset):
    """Images, masks and image-level labels of one split of a VOC-layout dataset.

    Each item is ``dict(image=float (3, H, W), mask=long (H, W), label=float (num_fg,), id=str)``; the mask
    is all 255 when the dataset has none. The transform is called as ``transform(image, mask, generator)``.
    With ``seed`` set, sample ``i`` of epoch ``e`` (see :meth:`set_epoch`) is augmented with a generator
    seeded from ``(seed, e, i)``, so augmentation does not depend on worker count or order and can be
    replayed exactly on resume; without it the global torch RNG is used.

    A split must have a mask for every image or for none (``require_masks`` demands them). Without masks
    the labels come from a labels file; with ``require_labels=False`` and no file, the labels are all zero
    and ``has_labels`` is False (for prediction on unlabelled images).

    ``mask_dir`` reads the masks from another folder (e.g. pseudo labels, ``<mask_dir>/<id>.png``) instead
    of ``ROOT/SegmentationClass``. ``saliency_dir`` adds ``saliency`` (long ``(H, W)``, 1 = salient, i.e.
    ``<saliency_dir>/<id>.png`` > 0) to each item, under the same geometric transform as the mask.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Transform | None = None,
        labels_file: str | Path | None = None,
        min_label_fraction: float = 0.0,
        require_masks: bool = False,
        require_labels: bool = True,
        seed: int | None = None,
        mask_dir: str | Path | None = None,
        saliency_dir: str | Path | None = None,
        class_names: Sequence[str] | None = None,
        background: bool = True,
    ):
        self.root = Path(root)
        self.mask_dir = self.root / "SegmentationClass" if mask_dir is None else Path(mask_dir)
        self.saliency_dir = None if saliency_dir is None else Path(saliency_dir)
        self.split = split
        self.transform = transform
        if not 0.0 <= min_label_fraction < 1.0:
            raise ConfigError(f"min_label_fraction must lie in [0, 1), got {min_label_fraction}")
        self.min_label_fraction = float(min_label_fraction)
        self.seed = seed
        self.epoch = 0
        if not self.root.is_dir():
            raise DataError(self.root, "dataset folder not found")
        self.is_image_folder = is_image_folder_dataset(self.root)
        if self.is_image_folder:
            self._open_image_folder(labels_file, class_names, background)
        else:
            if split is None or (split == ALL_IMAGES and not self._split_path(split).is_file()):
                raise ConfigError(f"{self.root} is a VOC-layout dataset: name a split of "
                                  f"{self.root / 'ImageSets' / 'Segmentation'} (--split)")
            self.classes = ClassSet.from_file(self.root / "classes.txt")
            self.ids = read_split(self._split_path(split))
            self._images = ImageFolder(self.root / "JPEGImages")
        self._image_paths = [self._images.find(image_id) for image_id in self.ids]
        self._path_of = dict(zip(self.ids, self._image_paths))
        self.has_masks = self._check_masks(require_masks)
        self._file_labels = self._load_file_labels(labels_file, require_labels)
        self.has_labels = self._file_labels is not None or self.has_masks
        self._mask_labels: dict[int, np.ndarray] = {}
        # Set by an objective that needs each crop's ROI (GETAM's dense-CRF loss): items then carry ``roi``.
        self.with_roi = False

    # ------------------------------------------------------------------------------------------- setup

    def _split_path(self, split: str) -> Path:
        return self.root / "ImageSets" / "Segmentation" / f"{split}.txt"

    def _open_image_folder(self, labels_file: str | Path | None, class_names: Sequence[str] | None,
                           background: bool) -> None:
        """A folder of your own images: ids are the labelled images (paths below the root, no extension), and
        the classes come from ``classes.txt``, else ``class_names`` (a checkpoint's), else the labels file."""
        if self.split not in (None, ALL_IMAGES):
            raise ConfigError(f"{self.root} is a folder of images without split lists: every labelled image is "
                              f"used; leave the split out (or name it {ALL_IMAGES!r}), not {self.split!r}")
        path = Path(labels_file) if labels_file is not None else find_labels_file(self.root)
        self.classes = image_folder_classes(self.root, path, class_names, background)
        self.ids = list(read_labels_file(path, self.classes))
        if not self.ids:
            raise DataError(path, "the labels file lists no image")
        self._images = ImageFolder(self.root)

    def _check_masks(self, require_masks: bool) -> bool:
        present = [self.mask_path(image_id).is_file() for image_id in self.ids]
        if all(present):
            return True
        missing = self.mask_path(self.ids[present.index(False)])
        if require_masks or any(present):
            # A split with only some masks is inconsistent: labels would silently change meaning.
            raise DataError(missing, f"mask not found ({present.count(False)} of {len(self.ids)} missing)")
        return False

    def _load_file_labels(self, labels_file: str | Path | None, require_labels: bool) -> dict[str, np.ndarray] | None:
        """Labels from an explicit file, else (only without masks) from ROOT/labels.json or labels.csv."""
        if labels_file is None and self.has_masks and not self.is_image_folder:
            return None
        path = Path(labels_file) if labels_file is not None else find_labels_file(self.root)
        if path is None:
            if require_labels:
                raise DataError(
                    self.root / LABEL_FILE_NAMES[0],
                    "dataset has no masks and no image-level labels file (labels.json or labels.csv)",
                )
            return None
        table = read_labels_file(path, self.classes)
        # Only this split's images must be labelled: one labels file usually serves every split.
        missing = [image_id for image_id in self.ids if image_id not in table]
        if missing:
            raise DataError(path, f"no labels for {len(missing)} image(s) of split {self.split!r}, e.g. {missing[0]!r}")
        empty = [image_id for image_id in self.ids if not table[image_id]]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise DataError(path, f"image {empty[0]!r} has an empty label set{more}")
        result = {}
        for image_id in self.ids:
            multi_hot = np.zeros(self.classes.num_fg, dtype=np.float32)
            multi_hot[[self.classes.label_to_output(k) for k in table[image_id]]] = 1.0
            result[image_id] = multi_hot
        return result

    # ------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> Path:
        """Path of the image of ``image_id`` (whatever its extension; see :class:`~wsss.data.layout.ImageFolder`)."""
        if image_id in self._path_of:
            return self._path_of[image_id]
        return self._images.find(image_id)

    def mask_path(self, image_id: str) -> Path:
        """Path of a mask (it may not exist when the dataset has none)."""
        return self.mask_dir / f"{image_id}.png"

    def load_saliency(self, index: int, image_size: tuple[int, int]) -> np.ndarray:
        """The binary saliency ``(H, W)`` uint8 (1 where ``<saliency_dir>/<id>.png`` > 0)."""
        if self.saliency_dir is None:
            raise ConfigError("this dataset has no saliency_dir")
        path = self.saliency_dir / f"{self.ids[index]}.png"
        saliency = read_mask(path)
        if tuple(saliency.shape) != tuple(image_size):
            raise DataError(path, f"saliency size {saliency.shape} differs from the image size {image_size} (HxW)")
        return (saliency > 0).astype(np.uint8)

    def load_image(self, index: int) -> np.ndarray:
        """The image as uint8 ``(H, W, 3)``."""
        return read_image(self._image_paths[index])

    def palette(self) -> np.ndarray | None:
        """The ``(256, 3)`` palette of the dataset's own masks (``ROOT/SegmentationClass``, read from the first
        image's mask, not from a ``mask_dir`` of pseudo labels), or None (VOC's colours) for greyscale masks or
        none. Label PNGs written for the dataset and pictures of its labels use it."""
        root = self.root / "SegmentationClass"
        for image_id in self.ids[:1]:
            return read_palette(root / f"{image_id}.png")
        return None

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of an image, read from its header only."""
        path = self._image_paths[index]
        try:
            with open_image(path) as im:  # over the pixel limit: a DataError, as read_image would raise
                return im.height, im.width
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(path, f"cannot decode image ({exc})") from exc

    def load_mask(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """The mask as uint8 ``(H, W)``, checked against the class list and the image size."""
        path = self.mask_path(self.ids[index])
        mask = read_mask(path, self.classes.num_classes)
        expected = image_size if image_size is not None else self.image_size(index)
        if tuple(mask.shape) != tuple(expected):
            raise DataError(
                path,
                f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image "
                f"{self._image_paths[index].name} size {expected[0]}x{expected[1]} (HxW)",
            )
        return mask

    def labels(self, index: int) -> np.ndarray:
        """Image-level multi-hot float32 ``(num_fg,)`` of the whole image, in classifier-output order."""
        if self._file_labels is not None:
            return self._file_labels[self.ids[index]].copy()
        if not self.has_masks:
            return np.zeros(self.classes.num_fg, dtype=np.float32)
        if index not in self._mask_labels:
            self._mask_labels[index] = labels_from_mask(self.load_mask(index), self.classes, self.min_label_fraction)
        return self._mask_labels[index].copy()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation stream :meth:`__getitem__` draws from (with ``seed`` set)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator | None:
        """The generator that augments sample ``index`` this epoch (``None``: global RNG)."""
        if self.seed is None:
            return None
        state = np.random.SeedSequence([int(self.seed), self.epoch, int(index)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load_image(index)
        height, width = image.shape[:2]
        if self.has_masks:
            mask_array = self.load_mask(index, (height, width))
        else:
            mask_array = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
        image_t, mask_t = to_tensor(image), mask_to_tensor(mask_array)
        saliency_t = None
        if self.saliency_dir is not None:
            # The saliency bit rides above the 0..255 labels, so one transform gives both the same geometry;
            # padding (mask 255) decodes as not salient, as the authors zero-pad their saliency maps.
            salient = torch.from_numpy(self.load_saliency(index, (height, width))).long()
            mask_t = mask_t + SALIENCY_BIT * salient
        if self.with_roi:
            mask_t = mask_t + ROI_BIT
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t, self.generator(index))
        roi_t = None
        if self.with_roi:
            roi_t, mask_t = (mask_t // ROI_BIT).to(torch.uint8), mask_t % ROI_BIT
        if self.saliency_dir is not None:
            saliency_t, mask_t = mask_t // SALIENCY_BIT, mask_t % SALIENCY_BIT
        if self._file_labels is None and self.has_masks:
            label = labels_from_mask(mask_t, self.classes, self.min_label_fraction)
        else:
            label = self.labels(index)
        item = {
            "image": image_t,
            "mask": mask_t,
            "label": torch.from_numpy(label),
            "id": self.ids[index],
        }
        if saliency_t is not None:
            item["saliency"] = saliency_t
        if roi_t is not None:
            item["roi"] = roi_t
        return item


def collate(batch: list[dict[str, Any]], pad_image: float = 0.0) -> dict[str, Any]:
    """Stack samples; images and masks of different sizes are padded bottom/right (mask with 255)."""
    heights = [item["image"].shape[-2] for item in batch]
    widths = [item["image"].shape[-1] for item in batch]
    height, width = max(heights), max(widths)
    first_item = batch[0]
    first = first_item["image"]
    images = torch.full((len(batch), first.shape[0], height, width), pad_image, dtype=first.dtype)
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.long)
    saliency = torch.zeros((len(batch), height, width), dtype=torch.long) if "saliency" in first_item else None
    roi = torch.zeros((len(batch), height, width), dtype=torch.uint8) if "roi" in first_item else None
    for k, item in enumerate(batch):
        h, w = item["image"].shape[-2:]
        images[k, :, :h, :w] = item["image"]
        masks[k, :h, :w] = item["mask"]
        if saliency is not None:
            saliency[k, :h, :w] = item["saliency"]
        if roi is not None:
            roi[k, :h, :w] = item["roi"]
    out = {
        "image": images,
        "mask": masks,
        "label": torch.stack([item["label"] for item in batch]),
        "id": [item["id"] for item in batch],
        "size": torch.tensor([[h, w] for h, w in zip(heights, widths)]),
    }
    if saliency is not None:
        out["saliency"] = saliency
    if roi is not None:
        out["roi"] = roi
    return out
