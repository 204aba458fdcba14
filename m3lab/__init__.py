"""m3lab: fine-tune BGE-M3 on a 16 GB T4 without running out of memory: measured, predicted, explained."""

import logging

# bitsandbytes (imported by peft, and for --optim adamw_bnb_8bit) warns on import, on CPUs with
# AVX512-BF16, that it cannot download a 4-bit CPU kernel; m3lab uses no 4-bit kernels.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
