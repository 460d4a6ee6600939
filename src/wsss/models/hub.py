"""Pretrained weights by name: ``ARCH.TAG`` (timm's tags, as users know them) resolved to a local file.

``resolve_pretrained("vit_base_patch16_224.augreg2_in21k_ft_in1k")`` finds, or downloads, the file behind a tag and
says what it holds (:class:`Source`: classes, normalisation, input size, the converter its key names need). A bare
architecture name is refused: every architecture has several sets of weights, and no one should get different
weights than they think.

Where a file is looked for, in this order:

1. ``$WSSS_WEIGHTS_DIR/ARCH.TAG/FILENAME`` or ``$WSSS_WEIGHTS_DIR/ARCH.TAG.EXT`` (``EXT`` one of ``safetensors``,
   ``pth``, ``pt``, ``bin``, ``npz``), for machines without a network: copy the file there by hand. For example
   ``$WSSS_WEIGHTS_DIR/vit_small_patch14_dinov2.lvd142m/model.safetensors`` or
   ``$WSSS_WEIGHTS_DIR/vit_small_patch14_dinov2.lvd142m.safetensors``.
2. The download cache: the huggingface_hub cache (``HF_HUB_CACHE``, or ``cache_dir``) for weights on the Hugging
   Face hub; for weights behind a plain URL, ``cache_dir`` or else torch hub's ``$TORCH_HOME/hub/checkpoints``
   (where ``torch.hub.load_state_dict_from_url`` keeps the same files).
3. A download: ``huggingface_hub.hf_hub_download`` (``pip install 'wsss[hub]'``), or the URL streamed into the cache
   through a temporary file renamed into place once complete (and its SHA-256 checked where a digest is known).

Nothing here reads the file: torch files are read later with ``weights_only=True`` (:mod:`wsss.models.weights`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..data.io import make_like_new_file
from ..errors import CheckpointError

WEIGHTS_DIR_ENV = "WSSS_WEIGHTS_DIR"
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Source:
    """Where one set of pretrained weights lives and what it holds.

    ``hf_repo``/``filename``: a file on the Hugging Face hub; ``url``: a direct download instead (``filename`` is
    then the name it is cached and looked for under). ``num_classes``: the classifier in the file (0: none, 512:
    CLIP's image-text projection). ``mean``/``std``/``img_size``: the input the weights were trained on.
    ``convert``: the name of a key converter in :data:`wsss.models.convert.CONVERTERS` the file needs, or None when
    it already uses timm's names. ``sha256``: the file's SHA-256, or its leading hex digits (torch hub's convention
    for the ``-HASH`` part of a file name), checked after a download.
    """

    hf_repo: str | None = None
    filename: str = "model.safetensors"
    num_classes: int = 1000
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    img_size: int = 224
    url: str | None = None
    convert: str | None = None
    sha256: str | None = None
    note: str = ""

    def describe(self) -> str:
        """Which file to fetch, in words."""
        if self.hf_repo:
            return (f"file {self.filename!r} of the Hugging Face repo {self.hf_repo} "
                    f"(https://huggingface.co/{self.hf_repo}/resolve/main/{self.filename})")
        if self.url:
            return self.url
        return f"{self.filename!r}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Resolved:
    """A tag resolved to a file: ``origin`` says where it was found (``weights_dir``, ``hf_cache``,
    ``hf_download``, ``url_cache`` or ``url_download``)."""

    arch: str
    tag: str
    source: Source
    path: Path
    origin: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"


def _timm(arch: str, tag: str, **kw) -> Source:
    """Weights in timm's own hub repo ``timm/ARCH.TAG`` (already in timm's key names)."""
    return Source(hf_repo=f"timm/{arch}.{tag}", **kw)


_IMNET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CLIP = dict(mean=CLIP_MEAN, std=CLIP_STD, num_classes=512)
_DINO_URL = "https://dl.fbaipublicfiles.com/dino"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
_DEIT_URL = "https://dl.fbaipublicfiles.com/deit"


def _augreg(arch: str, img_size: int = 224, in1k: bool = True, augreg2: bool = False) -> dict[str, Source]:
    """The "How to train your ViT" family (ImageNet-21k pretraining, Inception normalisation)."""
    tags = {"augreg_in21k_ft_in1k": _timm(arch, "augreg_in21k_ft_in1k", img_size=img_size)}
    if augreg2:
        tags["augreg2_in21k_ft_in1k"] = _timm(arch, "augreg2_in21k_ft_in1k", img_size=img_size,
                                              note="augreg weights fine-tuned again on ImageNet-1k by timm")
    if in1k:
        tags["augreg_in1k"] = _timm(arch, "augreg_in1k", img_size=img_size, note="trained on ImageNet-1k only")
    if img_size == 224:
        tags["augreg_in21k"] = _timm(arch, "augreg_in21k", num_classes=21843,
                                     note="ImageNet-21k classifier, not fine-tuned")
    return tags


def _dino(timm_arch: str, official: str) -> dict[str, Source]:
    return {
        "dino": _timm(timm_arch, "dino", num_classes=0, **_IMNET, note="DINO self-supervised, no classifier"),
        "dino_official": Source(url=f"{_DINO_URL}/{official}/{official}.pth", filename=f"{official}.pth",
                                num_classes=0, **_IMNET, note="DINO's own release (timm's key names)"),
    }


def _deit(arch: str, digest: str, img_size: int = 224) -> dict[str, Source]:
    official = f"{arch}-{digest}.pth"
    return {
        "fb_in1k": _timm(arch, "fb_in1k", img_size=img_size, **_IMNET),
        "fb_in1k_official": Source(url=f"{_DEIT_URL}/{official}", filename=official, img_size=img_size,
                                   sha256=digest, **_IMNET, note="DeiT's own release"),
    }


def _dinov2(arch: str, official: str, reg: bool) -> dict[str, Source]:
    full = f"{official}_reg4" if reg else official
    kw = dict(num_classes=0, img_size=518, **_IMNET)
    return {
        "lvd142m": _timm(arch, "lvd142m", **kw, note="DINOv2 (LVD-142M), no classifier"),
        "lvd142m_official": Source(url=f"{_DINOV2_URL}/{official}/{full}_pretrain.pth",
                                   filename=f"{full}_pretrain.pth", convert="dinov2_official", **kw,
                                   note="DINOv2's torch hub release (facebookresearch/dinov2 key names)"),
    }


PRETRAINED: dict[str, dict[str, Source]] = {
    "vit_tiny_patch16_224": _augreg("vit_tiny_patch16_224", in1k=False),
    "vit_small_patch16_224": {
        **_augreg("vit_small_patch16_224"),
        "dino": _timm("vit_small_patch16_224", "dino", num_classes=0, **_IMNET, note="DINO, no classifier"),
    },
    "vit_base_patch16_224": {
        **_augreg("vit_base_patch16_224", augreg2=True),
        "orig_in21k_ft_in1k": _timm("vit_base_patch16_224", "orig_in21k_ft_in1k",
                                    note="the original ViT paper's weights"),
        "orig_in21k": _timm("vit_base_patch16_224", "orig_in21k", num_classes=0,
                            note="the original ViT paper's ImageNet-21k weights, classifier removed"),
        "dino": _timm("vit_base_patch16_224", "dino", num_classes=0, **_IMNET, note="DINO, no classifier"),
    },
    "vit_base_patch16_384": {
        **_augreg("vit_base_patch16_384", img_size=384),
        "orig_in21k_ft_in1k": _timm("vit_base_patch16_384", "orig_in21k_ft_in1k", img_size=384,
                                    note="the original ViT paper's weights"),
    },
    "vit_small_patch8_224": _dino("vit_small_patch8_224", "dino_deitsmall8_pretrain"),
    "vit_base_patch8_224": {
        "augreg2_in21k_ft_in1k": _timm("vit_base_patch8_224", "augreg2_in21k_ft_in1k"),
        "augreg_in21k_ft_in1k": _timm("vit_base_patch8_224", "augreg_in21k_ft_in1k"),
        **_dino("vit_base_patch8_224", "dino_vitbase8_pretrain"),
    },
    # DINO's patch-8 backbones under their own names: the same files as timm's vit_*_patch8_224.dino.
    "dino_vits8": _dino("vit_small_patch8_224", "dino_deitsmall8_pretrain"),
    "dino_vitb8": _dino("vit_base_patch8_224", "dino_vitbase8_pretrain"),
    "deit_tiny_patch16_224": _deit("deit_tiny_patch16_224", "a1311bcf"),
    "deit_small_patch16_224": _deit("deit_small_patch16_224", "cd65a155"),
    "deit_base_patch16_224": _deit("deit_base_patch16_224", "b5f2ef4d"),
    "deit_base_patch16_384": _deit("deit_base_patch16_384", "8de9b5d1", img_size=384),
    "deit_tiny_distilled_patch16_224": _deit("deit_tiny_distilled_patch16_224", "b40b3cf7"),
    "deit_small_distilled_patch16_224": _deit("deit_small_distilled_patch16_224", "649709d9"),
    "deit_base_distilled_patch16_224": _deit("deit_base_distilled_patch16_224", "df68dfff"),
    "deit_base_distilled_patch16_384": _deit("deit_base_distilled_patch16_384", "d0272ac0", img_size=384),
    "vit_base_r50_s16_384": {
        "orig_in21k_ft_in1k": _timm("vit_base_r50_s16_384", "orig_in21k_ft_in1k", img_size=384,
                                    note="R50+ViT-B/16 of the original ViT paper"),
    },
    "vit_small_patch14_dinov2": _dinov2("vit_small_patch14_dinov2", "dinov2_vits14", reg=False),
    "vit_base_patch14_dinov2": _dinov2("vit_base_patch14_dinov2", "dinov2_vitb14", reg=False),
    "vit_small_patch14_reg4_dinov2": _dinov2("vit_small_patch14_reg4_dinov2", "dinov2_vits14", reg=True),
    "vit_base_patch14_reg4_dinov2": _dinov2("vit_base_patch14_reg4_dinov2", "dinov2_vitb14", reg=True),
    "vit_base_patch16_clip_224": {
        "openai": _timm("vit_base_patch16_clip_224", "openai", **_CLIP,
                        note="OpenAI CLIP image tower (QuickGELU); head = the 768->512 image-text projection"),
        "openai_hf": Source(hf_repo="openai/clip-vit-base-patch16", convert="hf_clip_vision", **_CLIP,
                            note="the same OpenAI weights in Hugging Face transformers' CLIPModel layout"),
    },
    "conformer_small_patch16": {
        "official_in1k": Source(
            filename="Conformer_small_patch16.pth", **_IMNET,
            note="Conformer-S from pengzhiliang/Conformer, published only on Baidu Pan "
                 "(https://pan.baidu.com/s/1kYOZ9mRP5fvujH6snsOjew, code qvu8) and Google Drive "
                 "(https://drive.google.com/file/d/1mpOlbLaVxOfEwV4-ha78j_1Ebqzj2B83/view): no direct download"),
    },
}


def list_pretrained() -> list[str]:
    """Every ``ARCH.TAG`` known."""
    return sorted(f"{arch}.{tag}" for arch, tags in PRETRAINED.items() for tag in tags)


def split_name(name: str) -> tuple[str, str | None]:
    """``"ARCH.TAG"`` -> ``(ARCH, TAG)``; a bare ``"ARCH"`` -> ``(ARCH, None)``. A leading ``timm/`` is dropped."""
    name = name.strip()
    if name.startswith("timm/"):
        name = name[len("timm/"):]
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def _tag_list(arch: str) -> str:
    return ", ".join(f"{arch}.{tag}" + (f" ({src.note})" if src.note else "")
                     for tag, src in PRETRAINED[arch].items())


def lookup(name: str) -> tuple[str, str, Source]:
    """The :class:`Source` behind ``ARCH.TAG``, without looking for the file."""
    arch, tag = split_name(name)
    if arch not in PRETRAINED:
        raise CheckpointError(f"{arch}: no pretrained weights are known for this architecture; architectures with "
                              f"pretrained weights: {', '.join(sorted(PRETRAINED))}")
    if tag is None:
        raise CheckpointError(f"{arch}: say which pretrained weights to use, as ARCH.TAG, one of: {_tag_list(arch)}")
    if tag not in PRETRAINED[arch]:
        raise CheckpointError(f"{arch}.{tag}: unknown pretrained tag; the tags of {arch} are: {_tag_list(arch)}")
    return arch, tag, PRETRAINED[arch][tag]


def weights_dir_candidates(arch: str, tag: str, source: Source) -> list[Path]:
    """The paths looked for under ``$WSSS_WEIGHTS_DIR`` (empty when it is not set), in order."""
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if not root:
        return []
    root = Path(root).expanduser()
    name = f"{arch}.{tag}"
    own = Path(source.filename).suffix.lower()
    suffixes = [own] + [s for s in LOCAL_SUFFIXES if s != own] if own else list(LOCAL_SUFFIXES)
    return [root / name / source.filename] + [root / f"{name}{s}" for s in suffixes]


def default_url_cache() -> Path:
    """torch hub's checkpoint folder, ``$TORCH_HOME/hub/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_pretrained(name: str, cache_dir: str | Path | None = None) -> Resolved:
    """The local file of the pretrained weights ``ARCH.TAG``, downloaded when needed (see the module docstring for
    where it is looked for). Raises :class:`CheckpointError` for a bare, unknown or unreachable name; offline, the
    error says which file to fetch and the exact path to put it at."""
    arch, tag, source = lookup(name)
    for path in weights_dir_candidates(arch, tag, source):
        if path.is_file():
            return Resolved(arch, tag, source, path, "weights_dir")
    if source.hf_repo:
        path, origin = _from_hf(arch, tag, source, cache_dir)
    elif source.url:
        path, origin = _from_url(arch, tag, source, cache_dir)
    else:
        raise _not_found(arch, tag, source, "it cannot be downloaded automatically")
    return Resolved(arch, tag, source, path, origin)


def _target_hint(arch: str, tag: str, source: Source) -> str:
    name = f"{arch}.{tag}"
    root = os.environ.get(WEIGHTS_DIR_ENV)
    if root:
        return f"put it at {Path(root).expanduser() / name / source.filename}"
    return (f"put it at ${WEIGHTS_DIR_ENV}/{name}/{source.filename} "
            f"(${WEIGHTS_DIR_ENV} is not set: set it to a folder of your choice)")


def _not_found(arch: str, tag: str, source: Source, reason: str) -> CheckpointError:
    return CheckpointError(f"{arch}.{tag}: pretrained weights not found locally and {reason}. "
                           f"Download {source.describe()} and {_target_hint(arch, tag, source)}")


def _from_hf(arch: str, tag: str, source: Source, cache_dir: str | Path | None) -> tuple[Path, str]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise _not_found(arch, tag, source, "huggingface_hub, needed to download them, is not installed "
                                            "(pip install 'wsss[hub]')") from None
    kw = dict(repo_id=source.hf_repo, filename=source.filename,
              cache_dir=None if cache_dir is None else str(cache_dir))
    try:
        return Path(hf_hub_download(**kw, local_files_only=True)), "hf_cache"
    except Exception:  # not in the cache (LocalEntryNotFoundError), or a cache the hub library cannot read
        pass
    try:
        return Path(hf_hub_download(**kw)), "hf_download"
    except Exception as exc:  # offline, HF_HUB_OFFLINE, a missing repo or file, an auth error
        raise _not_found(arch, tag, source, f"the download failed ({type(exc).__name__}: {exc})") from exc


def _from_url(arch: str, tag: str, source: Source, cache_dir: str | Path | None) -> tuple[Path, str]:
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_url_cache()
    dst = folder / source.filename
    if dst.is_file():
        return dst, "url_cache"
    try:
        download_url(source.url, dst, sha256=source.sha256)
    except CheckpointError as exc:
        raise _not_found(arch, tag, source, f"the download was refused: {exc}") from exc
    except Exception as exc:  # URLError, HTTPError, timeouts, a full disk
        raise _not_found(arch, tag, source, f"the download failed ({type(exc).__name__}: {exc})") from exc
    return dst, "url_download"


def download_url(url: str, dst: str | Path, sha256: str | None = None, timeout: float = 60.0,
                 chunk_size: int = 1 << 20) -> Path:
    """Stream ``url`` into ``dst``: a temporary file beside it, renamed into place only once complete and, where
    ``sha256`` (a full digest or its leading hex digits) is given, once its digest matches. A failed or refused
    download leaves nothing behind."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        make_like_new_file(tmp)  # mkstemp's 0600 would make the weights unreadable to the user's group
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
            progress = _progress(int(total) if total and total.isdigit() else None, dst.name)
            try:
                while True:
                    chunk = response.read(chunk_size)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
            finally:
                if progress is not None:
                    progress.close()
        if sha256:
            got, want = digest.hexdigest(), sha256.lower()
            if not got.startswith(want):
                raise CheckpointError(f"{url}: SHA-256 {got} does not match the expected {want}")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dst


def _progress(total: int | None, name: str):
    """A tqdm bar on an interactive stderr, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name)
