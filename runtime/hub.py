"""What PhiClip's processes do about the Hugging Face Hub's settings when the Hub is switched off."""

from __future__ import annotations

import logging

from huggingface_hub import constants

# bitsandbytes' CPU backend asks the `kernels` package for a bf16 kernel on the Hub (kernels-community) when it
# is imported; both log a line about it. These are the loggers, and what their lines name.
KERNEL_FETCH_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")
KERNEL_HUB_ORG = "kernels-community"


def _demote_kernel_fetch(record: logging.LogRecord) -> bool:
    if KERNEL_HUB_ORG in record.getMessage():
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


def quiet_offline_kernel_fetch() -> None:
    """With ``HF_HUB_OFFLINE`` set, log the lines about fetching bitsandbytes' kernel from the Hub at debug level.

    Offline, the fetch cannot succeed, and the kernel is a bf16 fast path that PhiClip's float32 CPU
    runs never use; bitsandbytes (0.50) has no setting to skip the attempt. Call before bitsandbytes
    is imported (peft imports it). Online, the lines are left as they are.
    """
    if constants.HF_HUB_OFFLINE:  # huggingface_hub's own reading of HF_HUB_OFFLINE
        for name in KERNEL_FETCH_LOGGERS:
            logging.getLogger(name).addFilter(_demote_kernel_fetch)
