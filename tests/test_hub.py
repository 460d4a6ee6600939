"""Pretrained tags resolved to files, without a network: the weights folder, a faked huggingface_hub and
``file://`` URLs stand in for the hub and the download servers."""

from __future__ import annotations

import hashlib
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wsss.data.io import current_umask
from wsss.errors import CheckpointError
from wsss.models import hub
from wsss.models.hub import Source, resolve_pretrained, split_name

# Every tag in the table, as read in timm's default_cfgs (timm/models/vision_transformer.py,
# vision_transformer_hybrid.py, deit.py) -- plus the project's own: ``*_official`` (the authors' direct downloads),
# ``openai_hf`` (the Hugging Face transformers repo) and the ``dino_vit*8`` aliases of timm's ``vit_*_patch8_224``.
TIMM_TAGS = {
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit_tiny_patch16_224.augreg_in21k",
    "vit_small_patch16_224.augreg_in21k_ft_in1k", "vit_small_patch16_224.augreg_in1k",
    "vit_small_patch16_224.augreg_in21k", "vit_small_patch16_224.dino",
    "vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224.augreg_in1k", "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224.orig_in21k_ft_in1k", "vit_base_patch16_224.orig_in21k", "vit_base_patch16_224.dino",
    "vit_base_patch16_384.augreg_in21k_ft_in1k", "vit_base_patch16_384.augreg_in1k",
    "vit_base_patch16_384.orig_in21k_ft_in1k",
    "vit_small_patch8_224.dino",
    "vit_base_patch8_224.augreg2_in21k_ft_in1k", "vit_base_patch8_224.augreg_in21k_ft_in1k",
    "vit_base_patch8_224.dino",
    "deit_tiny_patch16_224.fb_in1k", "deit_small_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k",
    "deit_base_patch16_384.fb_in1k", "deit_tiny_distilled_patch16_224.fb_in1k",
    "deit_small_distilled_patch16_224.fb_in1k", "deit_base_distilled_patch16_224.fb_in1k",
    "deit_base_distilled_patch16_384.fb_in1k",
    "vit_base_r50_s16_384.orig_in21k_ft_in1k",
    "vit_small_patch14_dinov2.lvd142m", "vit_base_patch14_dinov2.lvd142m",
    "vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch16_clip_224.openai",
}
OWN_TAGS = {
    "vit_small_patch8_224.dino_official", "vit_base_patch8_224.dino_official",
    "dino_vits8.dino", "dino_vits8.dino_official", "dino_vitb8.dino", "dino_vitb8.dino_official",
    *(f"{a}.fb_in1k_official" for a in (
        "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
        "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
        "deit_base_distilled_patch16_384")),
    *(f"{a}.lvd142m_official" for a in (
        "vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
        "vit_base_patch14_reg4_dinov2")),
    "vit_base_patch16_clip_224.openai_hf",
    "conformer_small_patch16.official_in1k",
}

DINOV2_URLS = {  # facebookresearch/dinov2: dinov2/hub/backbones.py + utils.py (_DINOV2_BASE_URL)
    "vit_small_patch14_dinov2": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
    "vit_base_patch14_dinov2": "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "vit_small_patch14_reg4_dinov2":
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "vit_base_patch14_reg4_dinov2":
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
}


@pytest.fixture(autouse=True)
def _no_weights_dir(monkeypatch):
    monkeypatch.delenv(hub.WEIGHTS_DIR_ENV, raising=False)


def _fake_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(3, dtype=torch.float32)}, str(path))
    return path


class FakeHub:
    """Stands in for ``huggingface_hub.hf_hub_download``: records its calls; ``cached`` answers
    ``local_files_only=True`` calls, ``remote`` the others; an exception instance is raised instead."""

    def __init__(self, cached=None, remote=None):
        self.cached, self.remote, self.calls = cached, remote, []

    def __call__(self, repo_id, filename, *, cache_dir=None, local_files_only=False, **kw):
        self.calls.append(dict(repo_id=repo_id, filename=filename, cache_dir=cache_dir,
                               local_files_only=local_files_only))
        answer = self.cached if local_files_only else self.remote
        if answer is None:
            answer = FileNotFoundError(f"{repo_id}/{filename} is not in the cache") if local_files_only \
                else AssertionError("no download expected")
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)


def install_hub(monkeypatch, fake):
    """Put ``fake`` in place of ``hf_hub_download``, in the real package when it is installed, else in a stub."""
    try:
        import huggingface_hub
        from huggingface_hub import hf_hub_download  # noqa: F401  (a lazy attribute: its import may fail alone)
    except ImportError:
        huggingface_hub = types.ModuleType("huggingface_hub")
        monkeypatch.setitem(sys.modules, "huggingface_hub", huggingface_hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake, raising=False)
    return fake


# --- names and the table ---------------------------------------------------------------------------------------

def test_split_name():
    assert split_name("vit_base_patch16_224.augreg2_in21k_ft_in1k") == ("vit_base_patch16_224", "augreg2_in21k_ft_in1k")
    assert split_name("vit_base_patch16_224") == ("vit_base_patch16_224", None)
    assert split_name("vit_base_patch16_224.") == ("vit_base_patch16_224", None)
    assert split_name("timm/vit_small_patch14_dinov2.lvd142m") == ("vit_small_patch14_dinov2", "lvd142m")


def test_table_tags_are_the_verified_ones():
    assert set(hub.list_pretrained()) == TIMM_TAGS | OWN_TAGS
    for name in TIMM_TAGS:
        arch, tag = split_name(name)
        src = hub.PRETRAINED[arch][tag]
        timm_arch = {"dino_vits8": "vit_small_patch8_224", "dino_vitb8": "vit_base_patch8_224"}.get(arch, arch)
        assert src.hf_repo == f"timm/{timm_arch}.{tag}" and src.filename == "model.safetensors"
        assert src.convert is None


def test_table_facts():
    P = hub.PRETRAINED
    assert P["vit_base_patch16_224"]["augreg2_in21k_ft_in1k"].mean == (0.5, 0.5, 0.5)
    assert P["vit_base_patch16_224"]["augreg_in21k"].num_classes == 21843
    assert P["vit_base_patch16_384"]["orig_in21k_ft_in1k"].img_size == 384
    assert P["deit_small_patch16_224"]["fb_in1k"].mean == hub.IMAGENET_MEAN
    assert P["vit_base_r50_s16_384"]["orig_in21k_ft_in1k"].std == (0.5, 0.5, 0.5)
    clip = P["vit_base_patch16_clip_224"]
    assert clip["openai"].num_classes == 512 and clip["openai"].mean == hub.CLIP_MEAN
    hf = clip["openai_hf"]
    assert (hf.hf_repo, hf.filename, hf.convert, hf.num_classes) == (
        "openai/clip-vit-base-patch16", "model.safetensors", "hf_clip_vision", 512)
    for arch, url in DINOV2_URLS.items():
        assert P[arch]["lvd142m"].num_classes == 0 and P[arch]["lvd142m"].img_size == 518
        off = P[arch]["lvd142m_official"]
        assert (off.url, off.filename, off.convert, off.hf_repo) == (
            url, url.rsplit("/", 1)[1], "dinov2_official", None)
    assert P["dino_vits8"]["dino"].hf_repo == "timm/vit_small_patch8_224.dino"
    assert P["deit_tiny_patch16_224"]["fb_in1k_official"].url == \
        "https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth"
    assert P["deit_tiny_patch16_224"]["fb_in1k_official"].sha256 == "a1311bcf"
    conformer = P["conformer_small_patch16"]["official_in1k"]
    assert conformer.url is None and conformer.hf_repo is None and "Baidu" in conformer.note


def test_bare_name_lists_the_tags():
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_base_patch16_224")
    msg = str(err.value)
    assert "say which pretrained weights" in msg
    for tag in hub.PRETRAINED["vit_base_patch16_224"]:
        assert f"vit_base_patch16_224.{tag}" in msg


def test_unknown_tag_lists_the_tags():
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_small_patch14_dinov2.in1k")
    msg = str(err.value)
    assert "unknown pretrained tag" in msg
    assert "vit_small_patch14_dinov2.lvd142m" in msg and "vit_small_patch14_dinov2.lvd142m_official" in msg


def test_unknown_arch():
    with pytest.raises(CheckpointError, match=r"vit_huge_nonsense: no pretrained weights are known"):
        resolve_pretrained("vit_huge_nonsense.in1k")


# --- the weights folder ----------------------------------------------------------------------------------------

def test_weights_dir_folder_layout_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    path = _fake_file(tmp_path / "vit_small_patch14_dinov2.lvd142m" / "model.safetensors")
    fake = install_hub(monkeypatch, FakeHub(cached=AssertionError("hub asked"), remote=AssertionError("hub asked")))
    got = resolve_pretrained("vit_small_patch14_dinov2.lvd142m")
    assert (got.path, got.origin, got.arch, got.tag) == (path, "weights_dir", "vit_small_patch14_dinov2", "lvd142m")
    assert got.name == "vit_small_patch14_dinov2.lvd142m" and got.source.num_classes == 0
    assert fake.calls == []


def test_weights_dir_flat_layout(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    path = _fake_file(tmp_path / "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors")
    assert resolve_pretrained("vit_base_patch16_224.augreg2_in21k_ft_in1k").path == path
    # an official .pth under the flat name; no download attempted (the URL path would fail here)
    pth = tmp_path / "vit_small_patch14_reg4_dinov2.lvd142m_official.pth"
    pth.write_bytes(b"not read here")
    got = resolve_pretrained("vit_small_patch14_reg4_dinov2.lvd142m_official")
    assert got.path == pth and got.source.convert == "dinov2_official"


def test_conformer_only_from_the_weights_dir(monkeypatch, tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("conformer_small_patch16.official_in1k")
    msg = str(err.value)
    assert "cannot be downloaded automatically" in msg and "Baidu" in msg
    assert "$WSSS_WEIGHTS_DIR/conformer_small_patch16.official_in1k/Conformer_small_patch16.pth" in msg
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    path = tmp_path / "conformer_small_patch16.official_in1k" / "Conformer_small_patch16.pth"
    path.parent.mkdir()
    path.write_bytes(b"x")
    assert resolve_pretrained("conformer_small_patch16.official_in1k").path == path


# --- the Hugging Face hub ---------------------------------------------------------------------------------------

def test_hub_cache_first(monkeypatch, tmp_path):
    cached = _fake_file(tmp_path / "hfcache" / "model.safetensors")
    fake = install_hub(monkeypatch, FakeHub(cached=cached))
    got = resolve_pretrained("vit_base_patch16_clip_224.openai", cache_dir=tmp_path / "hfcache")
    assert (got.path, got.origin) == (cached, "hf_cache")
    assert fake.calls == [dict(repo_id="timm/vit_base_patch16_clip_224.openai", filename="model.safetensors",
                               cache_dir=str(tmp_path / "hfcache"), local_files_only=True)]


def test_hub_download_when_not_cached(monkeypatch, tmp_path):
    served = _fake_file(tmp_path / "served" / "model.safetensors")
    fake = install_hub(monkeypatch, FakeHub(remote=served))
    got = resolve_pretrained("vit_base_patch16_clip_224.openai_hf")
    assert (got.path, got.origin) == (served, "hf_download")
    assert [c["local_files_only"] for c in fake.calls] == [True, False]
    assert {c["repo_id"] for c in fake.calls} == {"openai/clip-vit-base-patch16"}
    assert got.source.convert == "hf_clip_vision"


def test_hub_network_error_says_what_to_fetch_and_where(monkeypatch, tmp_path):
    install_hub(monkeypatch, FakeHub(remote=OSError("Network is unreachable")))
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_small_patch14_reg4_dinov2.lvd142m")
    msg = str(err.value)
    assert "timm/vit_small_patch14_reg4_dinov2.lvd142m" in msg and "'model.safetensors'" in msg
    assert "Network is unreachable" in msg
    assert str(tmp_path / "weights" / "vit_small_patch14_reg4_dinov2.lvd142m" / "model.safetensors") in msg


def test_hub_error_without_weights_dir_names_the_variable(monkeypatch):
    install_hub(monkeypatch, FakeHub(remote=ConnectionError("offline")))
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("deit_small_patch16_224.fb_in1k")
    msg = str(err.value)
    assert "$WSSS_WEIGHTS_DIR/deit_small_patch16_224.fb_in1k/model.safetensors" in msg
    assert "https://huggingface.co/timm/deit_small_patch16_224.fb_in1k/resolve/main/model.safetensors" in msg


def test_missing_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    msg = str(err.value)
    assert "pip install 'wsss[hub]'" in msg and "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in msg
    assert str(tmp_path / "vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors") in msg


# --- direct URLs -------------------------------------------------------------------------------------------------

def _url_source(monkeypatch, payload_file: Path, sha256: str | None) -> str:
    src = Source(url=payload_file.as_uri(), filename="weights_test.pth", num_classes=0, sha256=sha256)
    monkeypatch.setitem(hub.PRETRAINED, "test_arch", {"test_tag": src})
    return "test_arch.test_tag"


def test_url_download_into_the_cache_then_served_from_it(monkeypatch, tmp_path):
    payload = tmp_path / "server" / "weights.pth"
    payload.parent.mkdir()
    payload.write_bytes(b"abc" * 100_000)
    digest = hashlib.sha256(payload.read_bytes()).hexdigest()
    name = _url_source(monkeypatch, payload, digest[:8])
    cache = tmp_path / "cache"
    got = resolve_pretrained(name, cache_dir=cache)
    assert (got.path, got.origin) == (cache / "weights_test.pth", "url_download")
    assert got.path.read_bytes() == payload.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["weights_test.pth"]  # no temporary file left
    assert got.path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600
    payload.unlink()  # the server is gone: the cache answers
    assert resolve_pretrained(name, cache_dir=cache).origin == "url_cache"


def test_url_digest_mismatch_leaves_nothing(monkeypatch, tmp_path):
    payload = tmp_path / "weights.pth"
    payload.write_bytes(b"tampered")
    name = _url_source(monkeypatch, payload, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="does not match the expected"):
        resolve_pretrained(name, cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_url_default_cache_is_torch_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    payload = tmp_path / "weights.pth"
    payload.write_bytes(b"xyz")
    got = resolve_pretrained(_url_source(monkeypatch, payload, None))
    assert got.path == tmp_path / "torch" / "hub" / "checkpoints" / "weights_test.pth"


def test_dinov2_official_offline_error(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path / "w"))
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_base_patch14_reg4_dinov2.lvd142m_official", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert DINOV2_URLS["vit_base_patch14_reg4_dinov2"] in msg and "name resolution" in msg
    assert str(tmp_path / "w" / "vit_base_patch14_reg4_dinov2.lvd142m_official" / "dinov2_vitb14_reg4_pretrain.pth") \
        in msg
    assert list((tmp_path / "cache").iterdir()) == []


# --- the real huggingface_hub, where it is installed ---------------------------------------------------------

def _real_hub_offline(monkeypatch):
    """The installed huggingface_hub, switched offline (it reads HF_HUB_OFFLINE once, at import)."""
    try:
        from huggingface_hub import constants, hf_hub_download  # noqa: F401
    except ImportError:
        pytest.skip("huggingface_hub is not installed (pip install 'wsss[hub]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_real_hub_cache_layout_is_found_offline(monkeypatch, tmp_path):
    """A file in huggingface_hub's own cache layout is found with the network switched off."""
    _real_hub_offline(monkeypatch)
    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cached = _fake_file(repo / "snapshots" / commit / "model.safetensors")
    got = resolve_pretrained("vit_small_patch14_dinov2.lvd142m", cache_dir=tmp_path / "hf")
    assert (got.path, got.origin) == (cached, "hf_cache")


def test_real_hub_offline_error(monkeypatch, tmp_path):
    _real_hub_offline(monkeypatch)
    with pytest.raises(CheckpointError) as err:
        resolve_pretrained("vit_base_patch16_clip_224.openai_hf", cache_dir=tmp_path / "hf")
    msg = str(err.value)
    assert "openai/clip-vit-base-patch16" in msg and "$WSSS_WEIGHTS_DIR/vit_base_patch16_clip_224.openai_hf/" in msg


def test_weights_dir_official_dinov2_end_to_end(monkeypatch, tmp_path):
    """A user's official DINOv2 .pth, found by tag, read with weights_only=True and converted by its keys."""
    from wsss.models import convert
    from wsss.models.weights import load_state_dict

    monkeypatch.setenv(hub.WEIGHTS_DIR_ENV, str(tmp_path))
    d = 8
    official = {"cls_token": torch.randn(1, 1, d), "pos_embed": torch.randn(1, 5, d), "mask_token": torch.randn(1, d),
                "register_tokens": torch.randn(1, 4, d), "blocks.0.ls1.gamma": torch.randn(d)}
    target = tmp_path / "vit_small_patch14_reg4_dinov2.lvd142m_official" / "dinov2_vits14_reg4_pretrain.pth"
    target.parent.mkdir()
    torch.save(official, target)
    got = resolve_pretrained("vit_small_patch14_reg4_dinov2.lvd142m_official")
    assert got.source.convert == "dinov2_official"
    state = convert.apply(load_state_dict(got.path))  # whether or not the loader converts already: idempotent
    assert set(state) == {"cls_token", "pos_embed", "reg_token", "blocks.0.ls1.gamma"}
    assert state["pos_embed"].shape == (1, 4, d)
