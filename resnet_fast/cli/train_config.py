"""The settings of a ``python -m resnet_fast train`` run (:class:`Config`): the options that fix
what a checkpoint continues, resolved from the command line, the checkpoint being resumed and
the defaults (:func:`resolve_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from resnet_fast.cli import UsageError, parse_size
from resnet_fast.cli.train_data import check_data_spec, default_size, default_small_input

__all__ = ["DEFAULTS", "Config", "resolve_config"]

# Settings that fix what a checkpoint continues: on --resume, those not given come from the
# checkpoint and those given must match it.
DEFAULTS = dict(model="resnet18", data="digits", size=None, small_input=None, epochs=1,
                batch=64, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=0,
                compare_eager=False, amp=False, amp_dtype=None, fake_samples=512,
                test_fraction=0.2, sync_bn=False)


@dataclasses.dataclass
class Config:
    model: str
    data: str
    size: tuple
    small_input: bool
    epochs: int
    batch: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    seed: int
    compare_eager: bool
    amp: bool
    amp_dtype: Optional[str]
    fake_samples: int
    test_fraction: float
    sync_bn: bool


def resolve_config(args, checkpoint: Optional[dict]) -> Config:
    """The run's settings: given options, else the checkpoint's (on --resume), else defaults.
    A given option that differs from the checkpoint's is an error."""
    saved = dict(checkpoint["config"]) if checkpoint else {}
    if saved:
        saved["size"] = tuple(saved["size"])
    values = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        if key == "size" and given is not None:
            given = parse_size(given)
        was = saved.get(key, default)
        if saved and given is not None and given != was:
            shown = "x".join(map(str, given)) if key == "size" else given
            was = "x".join(map(str, was)) if key == "size" else was
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {shown} differs from the checkpoint's ({was}); resume "
                             f"with the same value or leave {flag} out")
        values[key] = given if given is not None else saved.get(key, default)
    values["data"] = check_data_spec(values["data"])
    if values["size"] is None:
        values["size"] = default_size(values["data"])
    if values["small_input"] is None:
        values["small_input"] = default_small_input(values["data"], values["size"])
    return Config(**values)
