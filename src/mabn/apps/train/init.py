"""Start a run from a pretrained checkpoint (``--init``), and recalibrate at the end (``--recalibrate``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...convert import convert_model
from ...models import encoder_of
from ...recalibrate import recalibrate
from ...serialization import load_checkpoint, model_from_checkpoint


def load_pretrained(model: nn.Module, config: dict[str, Any], mc: dict[str, Any]) -> str:
    """Load ``config["init"]``'s weights into ``model`` (its ResNet encoder, :func:`mabn.models.encoder_of`; all of a
    timm or torchvision classifier); return a summary.

    The pretrained model's norm layers are converted to the run's (``mabn.convert_model`` with
    ``preserve=config["init_preserve"]``), or frozen with ``freeze_norm``; the classifier of a
    pretrained classifier is dropped. Every other weight and statistic of the target must come from
    the checkpoint.
    """
    pretrained = model_from_checkpoint(load_checkpoint(config["init"]))  # evaluation mode
    target = encoder_of(model)
    if config["freeze_norm"]:
        convert_model(pretrained, "frozen_bn")  # the target's encoder was built frozen (mc["frozen_encoder"])
    else:
        try:
            convert_model(pretrained, mc["norm"], preserve=config["init_preserve"], **mc["norm_kwargs"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"--init {config['init']}: cannot convert its norm layers to {mc['norm']!r}: {exc}"
            ) from None
    source = pretrained.state_dict()
    wanted = target.state_dict()
    missing = [k for k in wanted if k not in source]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"--init {config['init']} does not fit the model: no {', '.join(missing[:3])}{more}")
    for key, value in wanted.items():
        if source[key].shape != value.shape:
            raise ValueError(
                f"--init {config['init']} does not fit the model: {key} is {tuple(source[key].shape)} there, "
                f"{tuple(value.shape)} here (same --arch family, --depth and --width?)"
            )
    target.load_state_dict({k: source[k] for k in wanted})
    dropped = sorted({k.split(".")[0] for k in source if k not in wanted})
    frozen = ", BatchNorms frozen" if config["freeze_norm"] else f", norms as {mc['norm']} ({config['init_preserve']})"
    return f"initialized {'the encoder' if target is not model else 'the model'} from {config['init']}" + (
        f" (dropped: {', '.join(dropped)}{frozen})" if dropped else f" ({frozen[2:]})"
    )


def recalibrate_run(model: nn.Module, source: Any, config: dict[str, Any], device: torch.device, rank: int) -> None:
    """Re-estimate the running statistics over ``config["recalibrate"]`` training batches (fixed order)."""
    n, batch = config["recalibrate"], config["batch_size"] // config["accumulate"]
    generator = torch.Generator().manual_seed(config["seed"] * 7919 + rank)
    count = min(n * batch, source.num_train // batch * batch)
    order = torch.randperm(source.num_train, generator=generator)[:count].view(-1, batch)
    seed = config["seed"] * 104_729 + rank
    recalibrate(model, source.train_batches(order, seed, config["workers"]), device=device)
