"""anefx verify: the emitted program itself, executed on Linux, against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import anefx
from anefx.generation import lower_decoder
from anefx.models.presets import get_preset
from anefx.models.synthetic import write_random_checkpoint
from anefx.targets.coreml import emit_functions
from anefx.targets.verify import verify

STEPS = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("verify")
    write_random_checkpoint(folder, get_preset("qwen3-tiny"), dtype=torch.float32, seed=3)
    return folder


def _ids() -> list[int]:
    return torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(4)).tolist()


def test_stateful_package_matches_transformers(ckpt: Path, tmp_path: Path) -> None:
    dec = lower_decoder(str(ckpt), batch=8, context=64, dtype=torch.float16)
    pkg = tmp_path / "dec.mlpackage"
    emit_functions({"prefill": dec.prefill, "decode": dec.decode}, pkg, default="decode")
    r = verify(pkg, str(ckpt), ids=_ids(), steps=STEPS)
    assert r.functions == ["decode", "prefill"]
    assert len(r.per_position_psnr_db) == STEPS  # 1 from the prefill, 31 decode steps
    assert r.psnr_db >= 60.0, r.render()
    assert r.top1_agreement == 1.0, r.render()
    # beside top-1: the reference token in the package's top 5, and a divergence near 0
    assert r.top5_containment == 1.0 and 0 <= r.kl_mean <= r.kl_max < 1e-4, r.render()
    assert r.tokens_package == r.tokens_reference
    # the wrong model (other head_dim) or no package: one clear error each
    with pytest.raises(anefx.AnefxInputError, match="not converted from this model"):
        verify(pkg, "preset:qwen2-tiny", steps=2)
    with pytest.raises(anefx.AnefxInputError, match="no such artifact"):
        verify(tmp_path / "missing.mlpackage", str(ckpt), steps=2)


def test_single_function_package(ckpt: Path, tmp_path: Path) -> None:
    low = anefx.lower(str(ckpt), seq_len=48, dtype=torch.float16)
    pkg = tmp_path / "m.mlpackage"
    anefx.emit(low, pkg)
    r = verify(pkg, str(ckpt), ids=_ids(), steps=STEPS)
    assert r.functions == ["main"]
    assert r.psnr_db >= 60.0 and r.top1_agreement == 1.0, r.render()
    with pytest.raises(anefx.AnefxInputError, match="exceed its length"):
        verify(pkg, str(ckpt), ids=_ids(), steps=48)


def test_a_wrong_package_is_caught(ckpt: Path, tmp_path: Path) -> None:
    """Another checkpoint's package (same shapes, other weights) fails both measures."""
    other = tmp_path / "other"
    write_random_checkpoint(other, get_preset("qwen3-tiny"), dtype=torch.float32, seed=99)
    low = anefx.lower(str(other), seq_len=48, dtype=torch.float16)
    pkg = tmp_path / "other.mlpackage"
    anefx.emit(low, pkg)
    r = verify(pkg, str(ckpt), ids=_ids(), steps=8)
    assert r.psnr_db < 20.0 and r.top1_agreement < 0.5, r.render()


def test_cli_verify_json(capsys, ckpt: Path, tmp_path: Path) -> None:
    from anefx.cli import main

    low = anefx.lower(str(ckpt), seq_len=24, dtype=torch.float16)
    pkg = tmp_path / "m.mlpackage"
    anefx.emit(low, pkg)
    ids = ",".join(map(str, _ids()))
    assert main(["verify", str(pkg), str(ckpt), "--ids", ids, "--steps", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["psnr_db"] >= 60.0 and out["top1_agreement"] == 1.0
    assert out["steps"] == 4 and len(out["per_position_psnr_db"]) == 4


def test_top5_containment_and_kl_by_hand() -> None:
    """The two distribution figures on logits whose answers are known by hand."""
    import math

    from anefx.targets.verify import distribution_agreement

    ref = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    # position 0: the same logits (KL 0, contained); position 1: the reference's best token
    # (6) pushed to the 6th place of the package: top-1 and top-5 both miss it
    got = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [6, 5, 4, 3, 2, 1, 0.0]])
    top5, kl = distribution_agreement(ref, got)
    assert top5 == 0.5
    assert kl[0] == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(ref[1].double(), -1)
    q = torch.softmax(got[1].double(), -1)
    assert kl[1] == pytest.approx(float((p * (p / q).log()).sum()))
    assert kl[1] > math.log(2)  # most of p's mass sits where q puts almost none
