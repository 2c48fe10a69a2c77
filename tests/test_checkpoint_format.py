"""Checkpoints of `resnet_fast train` from other format versions: one line saying why.

``resnet_fast.train/1`` is the one format written so far; a checkpoint of another version of
that format, of another program, or a file torch cannot read is refused with a one-line
``UsageError`` (the command turns it into exit status 2) that names what was found.
"""

from __future__ import annotations

import pytest
import torch

from resnet_fast.cli import UsageError
from resnet_fast.cli.train_checkpoint import CHECKPOINT_FORMAT, load_checkpoint


def _saved(tmp_path, obj) -> str:
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return str(path)


def test_current_format_loads(tmp_path):
    state = {"format": CHECKPOINT_FORMAT, "step": 3, "weights": torch.ones(2)}
    loaded = load_checkpoint(_saved(tmp_path, state))
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], state["weights"])


@pytest.mark.parametrize("found, expected", [
    ("resnet_fast.train/0", "has checkpoint format 'resnet_fast.train/0'"),
    ("resnet_fast.train/2", "has checkpoint format 'resnet_fast.train/2'"),
    ("torchvision", "is not a checkpoint of `resnet_fast train`"),
    (None, "is not a checkpoint of `resnet_fast train`"),
])
def test_other_formats_fail_with_one_line(tmp_path, found, expected):
    state = {"step": 3} if found is None else {"format": found, "step": 3}
    with pytest.raises(UsageError) as err:
        load_checkpoint(_saved(tmp_path, state))
    message = str(err.value)
    assert expected in message and "\n" not in message
    if found is not None and found.startswith("resnet_fast.train/"):
        assert repr(CHECKPOINT_FORMAT) in message


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_unreadable_file_fails_with_one_line(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError) as err:
        load_checkpoint(str(path))
    assert "is not a readable checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_a_tensor_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="is not a checkpoint of `resnet_fast train`"):
        load_checkpoint(_saved(tmp_path, torch.zeros(3)))
