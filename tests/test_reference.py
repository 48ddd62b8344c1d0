"""Golden check against the authors' reference algorithms (see tests/golden/README.md)."""
from pathlib import Path

import pytest
import timm
import torch

import ltmpctl

GOLDEN = torch.load(Path(__file__).parent / "golden" / "reference_outputs.pt", weights_only=True)


def _model() -> torch.nn.Module:
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4,
                          num_heads=2, num_classes=10)
    m.load_state_dict(GOLDEN["state_dict"])
    return m.eval()


def _ltmp() -> torch.nn.Module:
    return ltmpctl.apply(_model(), "ltmp", merge_threshold=GOLDEN["merge_threshold"],
                         prune_threshold=GOLDEN["prune_threshold"])


def test_ltmp_eval_batch1_matches_reference():
    m = _ltmp()
    imgs = GOLDEN["images"]
    with torch.no_grad():
        for i in range(len(imgs)):
            out = m(imgs[i:i + 1])
            assert int(ltmpctl.token_counts(m)[0, -1, 1]) == GOLDEN["ltmp_eval_tokens"][i]
            torch.testing.assert_close(out[0], GOLDEN["ltmp_eval_logits"][i], atol=1e-5, rtol=0)


def test_ltmp_eval_batched_matches_reference_per_image():
    m = _ltmp()
    with torch.no_grad():
        out = m(GOLDEN["images"])
    kept = ltmpctl.token_counts(m)[:, -1, 1].long().tolist()
    assert kept == GOLDEN["ltmp_eval_tokens"] and len(set(kept)) > 1  # images really keep different counts
    torch.testing.assert_close(out, GOLDEN["ltmp_eval_logits"], atol=1e-5, rtol=0)


def test_ltmp_train_forward_matches_reference():
    m = _ltmp().train()
    out = m(GOLDEN["images"])
    torch.testing.assert_close(out, GOLDEN["ltmp_train_logits"], atol=1e-5, rtol=0)
    kept = torch.stack([mask.sum(1) for mask in m.ltmpctl_masks])
    torch.testing.assert_close(kept, GOLDEN["ltmp_train_kept"])


@pytest.mark.parametrize("batch", [1, 6])
def test_tome_matches_reference(batch):
    m = ltmpctl.apply(_model(), "tome", r=GOLDEN["tome_r"], inflect=GOLDEN["tome_inflect"])
    with torch.no_grad():
        out = torch.cat([m(GOLDEN["images"][i:i + batch]) for i in range(0, 6, batch)])
    torch.testing.assert_close(out, GOLDEN["tome_logits"], atol=1e-5, rtol=0)
