"""Class text embeddings (ViLD templates, synonyms, caching) and the M2F-Lang TextClassifier."""

import math

import pytest
import torch
import torch.nn.functional as F

from dearli.config import load_config
from dearli.config_model import ClassifierConfig
from dearli.errors import DataError
from dearli.model import text_classifier as tc
from dearli.model.backbone import build_backbone
from dearli.model.text_classifier import (
    VILD_TEMPLATES,
    TextClassifier,
    class_text_embeddings,
    reduce_synonyms,
    synonym_table,
)

CLASSES = [["person", "man"], ["sky"], ["tree", "plant", "bush"]]


class CountingEncoder:
    """Wraps backbone.encode_text to count calls."""

    def __init__(self, backbone, monkeypatch):
        self.calls = 0
        self.inner = backbone.encode_text
        monkeypatch.setattr(backbone, "encode_text", self)

    def __call__(self, texts):
        self.calls += 1
        return self.inner(texts)


def test_vild_templates():
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    assert all(t.count("{}") == 1 for t in VILD_TEMPLATES)


def test_embeddings_are_template_means_normalised(backbone):
    tc._MEMORY_CACHE.clear()
    text = class_text_embeddings(backbone, CLASSES)
    assert text.embeddings.shape == (6, backbone.embed_dim)
    assert text.synonym_to_class.tolist() == [0, 0, 1, 2, 2, 2]
    assert torch.allclose(text.embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)
    prompts = F.normalize(backbone.encode_text([t.format("plant") for t in VILD_TEMPLATES]), dim=-1)
    assert torch.allclose(text.embeddings[4], F.normalize(prompts.mean(0), dim=0), atol=1e-5)
    # Deterministic: a fresh encoding gives the same rows.
    tc._MEMORY_CACHE.clear()
    assert torch.equal(class_text_embeddings(backbone, CLASSES).embeddings, text.embeddings)


def test_embeddings_are_cached_in_memory(backbone, monkeypatch):
    tc._MEMORY_CACHE.clear()
    counter = CountingEncoder(backbone, monkeypatch)
    first = class_text_embeddings(backbone, CLASSES)
    assert counter.calls == 1
    second = class_text_embeddings(backbone, [list(c) for c in CLASSES])
    assert counter.calls == 1
    assert torch.equal(first.embeddings, second.embeddings)
    class_text_embeddings(backbone, [["sky"], ["road"]])
    assert counter.calls == 2
    # New text-tower weights (e.g. a checkpoint loaded into this instance) invalidate the entry.
    weight = backbone.clip.ln_final.bias
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)
    try:
        changed = class_text_embeddings(backbone, CLASSES)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert counter.calls == 3
    assert not torch.allclose(changed.embeddings, first.embeddings)
    class_text_embeddings(backbone, CLASSES)
    assert counter.calls == 3


def test_disk_cache_for_pretrained_backbones(backbone, monkeypatch, tmp_path):
    tc._MEMORY_CACHE.clear()
    monkeypatch.setattr(backbone, "pretrained", "some-tag")
    first = class_text_embeddings(backbone, CLASSES, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    tc._MEMORY_CACHE.clear()
    counter = CountingEncoder(backbone, monkeypatch)
    again = class_text_embeddings(backbone, CLASSES, cache_dir=tmp_path)
    assert counter.calls == 0
    assert torch.equal(first.embeddings, again.embeddings)
    assert torch.equal(first.synonym_to_class, again.synonym_to_class)
    # New text weights under the same tag (a file replaced at the same path): encoded again, in a new file.
    tc._MEMORY_CACHE.clear()
    weight = next(p for n, p in backbone.named_parameters() if ".visual." not in f".{n}")
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.5)
    try:
        changed = class_text_embeddings(backbone, CLASSES, cache_dir=tmp_path)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert counter.calls == 1 and len(list(tmp_path.glob("*.pt"))) == 2
    assert not torch.allclose(changed.embeddings, first.embeddings)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no half file left


def test_models_keep_text_embeddings_where_every_process_finds_them(monkeypatch, tmp_path):
    from dearli.model.m2f_lang import build_m2f_lang

    monkeypatch.setenv("DEARLI_TEXT_CACHE", str(tmp_path / "text"))
    assert tc.text_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("DEARLI_TEXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.text_cache_dir() == tmp_path / "xdg" / "dearli" / "text"
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    build_m2f_lang(cfg, CLASSES)  # random weights: nothing written
    assert not (tmp_path / "xdg").exists()
    import dataclasses

    from dearli.model.backbone import create_random_clip

    weights = tmp_path / "clip.pt"
    torch.save(create_random_clip(cfg.backbone.clip_model).state_dict(), weights)
    local = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=str(weights)))
    first = build_m2f_lang(local, CLASSES)  # weights from a file, as users give them: kept on disk
    assert len(list((tmp_path / "xdg" / "dearli" / "text").glob("text_*.pt"))) == 1
    tc._MEMORY_CACHE.clear()
    again = build_m2f_lang(local, CLASSES)  # another process would read the file
    assert torch.equal(first.text.embeddings, again.text.embeddings)


def test_bad_class_lists(backbone):
    with pytest.raises(DataError):
        class_text_embeddings(backbone, [])
    with pytest.raises(DataError, match="class 1"):
        class_text_embeddings(backbone, [["sky"], []])


def test_synonym_table_and_max():
    index = torch.tensor([1, 0, 2, 0, 2, 2])
    table = synonym_table(index, 3)
    assert table.tolist() == [[1, 3, -1], [0, -1, -1], [2, 4, 5]]
    logits = torch.tensor([[0.5, 0.1, -1.0, 0.7, 2.0, -3.0]])
    assert torch.allclose(reduce_synonyms(logits, table), torch.tensor([[0.7, 0.5, 2.0]]))
    with pytest.raises(ValueError, match="synonym"):
        synonym_table(torch.tensor([0, 2]), 3)


def make_classifier(embed_dim=8, num_text=5, index=(0, 0, 1, 2, 2)):
    torch.manual_seed(1)
    clf = TextClassifier(16, embed_dim, ClassifierConfig())
    clf.set_text_embeddings(torch.randn(num_text, embed_dim), torch.tensor(index))
    return clf


def test_classifier_logits_synonym_max_and_void():
    clf = make_classifier()
    queries = torch.randn(2, 7, 16)
    logits = clf(queries)
    assert logits.shape == (2, 7, 4)
    x = F.normalize(clf.class_embed(queries), dim=-1)
    cos = x @ F.normalize(clf.text_embeddings, dim=-1).t()
    scale = 1 / 0.07
    expected = torch.stack([cos[..., :2].amax(-1), cos[..., 2], cos[..., 3:].amax(-1)], dim=-1) * scale
    void = x @ F.normalize(clf.void_embedding, dim=-1).t() * scale
    assert torch.allclose(logits[..., :3], expected, atol=1e-5)
    assert torch.allclose(logits[..., 3:], void, atol=1e-5)
    assert clf.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_logit_scale_clamp_and_gradients():
    clf = make_classifier()
    with torch.no_grad():
        clf.logit_scale.fill_(math.log(1000.0))
    assert clf.scale().item() == pytest.approx(100.0)
    logits = clf(torch.randn(1, 3, 16))
    assert logits.abs().max() <= 100.0 + 1e-4
    logits.sum().backward()
    assert clf.void_embedding.grad is not None and clf.class_embed[0].weight.grad is not None
    assert clf.logit_scale.grad.item() == 0.0  # clamped: no gradient past the cap
    assert not clf.text_embeddings.requires_grad


def test_text_embeddings_are_swappable_and_not_in_checkpoint():
    clf = make_classifier()
    assert "text_embeddings" not in clf.state_dict()
    assert "logit_scale" in clf.state_dict() and "void_embedding" in clf.state_dict()
    clf.set_text_embeddings(torch.randn(6, 8))
    assert clf.num_classes == 6 and clf(torch.randn(1, 2, 16)).shape == (1, 2, 7)
    with pytest.raises(ValueError):
        clf.set_text_embeddings(torch.randn(6, 5))
    empty = TextClassifier(16, 8, ClassifierConfig())
    with pytest.raises(RuntimeError, match="set_text_embeddings"):
        empty(torch.randn(1, 2, 16))


def test_classifier_with_real_text_embeddings(backbone):
    text = class_text_embeddings(backbone, CLASSES)
    clf = TextClassifier(16, backbone.embed_dim, ClassifierConfig())
    clf.set_text_embeddings(*text)
    assert clf(torch.randn(2, 4, 16)).shape == (2, 4, len(CLASSES) + 1)


def test_classifier_runs_in_fp32_under_autocast():
    """bf16 autocast (the student under AMP) must not reach the cosine logits: they are scaled by up to 100."""
    clf = make_classifier(embed_dim=64, num_text=40, index=tuple(range(20)) * 2)
    with torch.no_grad():
        clf.logit_scale.fill_(math.log(100.0))
    queries = torch.randn(2, 50, 16).bfloat16().float()  # values a bf16 decoder could hand over
    with torch.no_grad():
        reference = clf(queries)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = clf(queries)
            # What the head would give if autocast reached it: off by far more than the tolerance below.
            x = F.normalize(clf.class_embed(queries), dim=-1)
            bf16_cos = (x @ clf.text_embeddings.t()).float() * 100
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=0, atol=1e-4)
    x = F.normalize(clf.class_embed(queries), dim=-1)
    assert (bf16_cos - (x @ clf.text_embeddings.t()) * 100).abs().max() > 1e-2


def test_prompts_are_encoded_on_the_context_they_use(backbone):
    """The text tower runs on the longest prompt's tokens, not CLIP's 77: the same embeddings, less work."""
    from dearli.model.backbone import encode_tokens

    prompts = [t.format(s) for s in ("chest of drawers", "sky") for t in VILD_TEMPLATES]
    tokens = backbone.tokenizer(prompts)
    assert int(tokens.ne(0).any(0).nonzero().max()) + 1 < tokens.shape[1] // 2
    with torch.no_grad():
        full = backbone.clip.encode_text(tokens, normalize=True)
        short = encode_tokens(backbone.clip, tokens)
    assert short.shape == full.shape and torch.allclose(short, full, atol=1e-5)


def test_memory_cache_keeps_the_most_recent_class_lists_only():
    backbone = build_backbone(load_config("tiny").model.backbone)
    lists = [[[f"class {i}"], ["other"]] for i in range(tc.MEMORY_LISTS_PER_BACKBONE + 2)]
    for names in lists:
        tc.class_text_embeddings(backbone, names)
    kept = tc._MEMORY_CACHE[backbone]
    assert len(kept) == tc.MEMORY_LISTS_PER_BACKBONE
    assert tc._check_class_names(lists[0]) not in {key[0] for key in kept}
    assert tc._check_class_names(lists[-1]) in {key[0] for key in kept}
