"""``ovseg-fast convert pixelclip IN OUT``: the authors' checkpoint keys -> a safetensors file that
``create_model("pixelclip", pretrained=OUT)`` loads; checkpoints that do not fit are refused."""

from __future__ import annotations

import warnings

import pytest
import torch

from ovseg_fast.cli import main
from ovseg_fast.models import create_model
from tests.helpers import tiny_clip
from tests.models.test_pixelclip import K, _their_state_dict

safetensors = pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def theirs():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        torch.manual_seed(0)
        model = create_model("pixelclip", clip=tiny_clip(64), image_size=64, mask_size=32, num_concepts=K)
    return _their_state_dict(model)


def test_convert_writes_a_checkpoint_create_model_loads(tmp_path, theirs, capsys):
    src, dst = tmp_path / "pixelclip_vit_base.pth", tmp_path / "pixelclip.safetensors"
    torch.save({"model": theirs}, src)
    assert main(["convert", "pixelclip", str(src), str(dst)]) == 0
    assert "num_concepts" in capsys.readouterr().out
    from safetensors.torch import load_file

    ours = load_file(str(dst))
    assert torch.equal(ours["prompt_words"], theirs["sem_seg_head.predictor.prompt_tokens"])
    assert torch.equal(ours["decoder.out.weight"], theirs["head.proj.weight"])
    assert not any(k.startswith("teacher.token_embedding") for k in ours)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*RANDOM weights")
        model = create_model(
            "pixelclip", pretrained=str(dst), clip=tiny_clip(64), image_size=64, mask_size=32, num_concepts=K
        )
    for key, value in ours.items():
        assert torch.equal(model.state_dict()[key], value), key
    # OUT exists: refused unless --force.
    assert main(["convert", "pixelclip", str(src), str(dst)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["convert", "pixelclip", str(src), str(dst), "--force"]) == 0


def test_convert_refuses_what_does_not_fit(tmp_path, theirs, capsys):
    bad = dict(theirs)
    bad["head.up2.bias"] = torch.zeros(7)
    src = tmp_path / "bad.pth"
    torch.save({"model": bad}, src)
    assert main(["convert", "pixelclip", str(src), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "shapes differ: decoder.up2.bias" in err and not (tmp_path / "out.safetensors").exists()
    assert main(["convert", "pixelclip", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["convert", "pixelclip", str(src), str(tmp_path / "out.pth")]) == 1
    assert ".safetensors" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", "pixelclip", str(tmp_path / "junk.pth"), str(tmp_path / "o.safetensors")]) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "nomodel", str(src), str(tmp_path / "o.safetensors")])
