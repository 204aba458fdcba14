# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The baseline OOM on a T4
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/01_baseline_oom.ipynb)
#
# FlagEmbedding's own example (`examples/finetune/embedder/encoder_only/m3.sh`: group 8, batch 2,
# fp16, gradient checkpointing, DeepSpeed stage 0, unified fine-tuning with self-distillation), run
# at BGE-M3's long context on a 16 GB T4. Why can it not fit, and what exactly is too big?
#
# *Every memory figure below says where it comes from: **measured on &lt;device&gt;** or **predicted for &lt;GPU&gt;**. On a CPU (and in CI) full-size figures are predicted by `m3lab.predict`, which traces FlagEmbedding's real training step on fake tensors, and real runs use `tiny-bge-m3`, an offline stand-in with BGE-M3's architecture at toy size. On a Colab or Kaggle GPU the same cells measure the real `BAAI/bge-m3`. In the tables, *peak alloc* is the traced peak of live tensors; *+cache+ctx* adds the caching allocator's cache and the CUDA context, both estimates (the cache estimate is capped at the card while the live tensors fit, so a close call reads 14.74); *to spare* is the card's 14.74 GiB minus that total.*

# %%
# Colab / Kaggle: fetch m3lab (code and data) and install it on top of the runtime. m3lab asks for
# ranges that hold the versions Colab ships (torch, transformers, numpy, protobuf, ...), so pip only
# adds what is missing (FlagEmbedding, DeepSpeed, bitsandbytes and a few small packages) and changes
# nothing already installed: no restart needed. Where m3lab is installed (make test), this does nothing.
import importlib.util, os, socket, subprocess, sys
REPOSITORY = "https://github.com/m3lab/m3lab"
if importlib.util.find_spec("m3lab") is None:
    source = os.environ.get("M3LAB_SOURCE", REPOSITORY)  # the Colab lane (make test-colab) clones a local copy
    if source.startswith("https://"):
        try:
            socket.create_connection(("github.com", 443), timeout=5).close()
        except OSError:
            raise SystemExit("No internet. On Kaggle, open Settings in the notebook's side bar, switch "
                             "Internet on (it needs a verified phone number), then run this cell again.")
    if not os.path.isdir("m3lab-repo"):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", source, "m3lab-repo"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", "m3lab-repo"], check=True)
    sys.path.insert(0, os.path.abspath("m3lab-repo"))

# %%
import matplotlib
matplotlib.rcParams["figure.dpi"] = 80
from m3lab import lessons, plots
from m3lab.config import TrainConfig
from m3lab.gpus import GIB

env = lessons.environment()
print(env.describe())
print(", ".join(f"{name} {version}" for name, version in lessons.versions().items()))

# %% [markdown]
# ## The baseline, once
#
# The series follows one run from here to the end (`m3lab.ledger`): FlagEmbedding's example as
# upstream ships it, with its `ds_stage0.json` (DeepSpeed stage 0 and DeepSpeed's own FusedAdam), on
# one T4. Each later lesson changes one knob from where the lesson before left it. The command and
# the JSON file it names, to copy (the JSON verbatim from FlagEmbedding, `data/upstream/`), and what
# was adapted:

# %%
from m3lab import ledger

example_8192 = ledger.baseline()
print(example_8192.shell_command(deepspeed_json_path="ds_stage0.json"))
print("\n# ds_stage0.json (FlagEmbedding's examples/finetune/ds_stage0.json, verbatim)")
print(ledger.baseline_json())
print("\nadapted from m3.sh: " + "; ".join(ledger.ADAPTED))

# %%
configs = {"example, passage 8192": example_8192,
           "example, passage 512": TrainConfig.upstream_example()}
reports = lessons.predict_all(configs, "t4")

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(reports))

# %%
plots.breakdown_bars(reports, title="FlagEmbedding's example on a T4");

# %%
# NBVAL_CHECK_OUTPUT

for label, report in reports.items():
    print(f"{label}: peak in {report.peak_phase} at {report.peak_op} ({report.peak_module}); "
          f"temporaries {report.breakdown['temporaries'] / GIB:.2f} GiB, "
          f"activations {report.breakdown['activations'] / GIB:.2f} GiB")
# FlagEmbedding's sparse head in training mode builds a (passages, tokens, vocabulary) tensor
passages, vocab = 2 * 8, 250_002
for tokens in (8192, 512):
    print(f"(16 x {tokens} x {vocab:,}) fp16 tensor: {passages * tokens * vocab * 2 / GIB:.2f} GiB")

# %% [markdown]
# **What the breakdown says.** It is not the weights (1 GiB in fp16) and not mostly the activations:
# the peak sits in backward, in the sparse head. In training mode FlagEmbedding's `_sparse_embedding`
# scatters each token's weight into a `torch.zeros(batch, seq_len, vocab_size)` tensor before taking
# the max over tokens: 16 passages x 8192 tokens x 250,002 vocabulary entries is 61 GiB per copy in
# fp16, and backward holds more than one. At 512 tokens the same head still needs several GiB, which
# is why even FlagEmbedding's example at its default lengths does not fit a T4. Gradient
# checkpointing, part of the example, does nothing for this tensor: it is made after the encoder.
#
# ## The real thing
#
# The next cell runs the example for one step and shows what comes back (the kernel survives:
# training runs in a child process). On a T4 that is the real BGE-M3 and the allocator's own
# message (a bigger GPU is capped to a T4's memory); on a CPU the same cell rehearses the failure
# with the stand-in in fp32 under a 256 MiB cap.

# %%
from m3lab.train import train

oom_run = train(env.sized(example_8192.replace(max_steps=1)), memory_limit_bytes=env.oom_limit_bytes)
print(oom_run.status)
print(oom_run.summary()[:400])

# %% [markdown]
# ## The tensor need not exist
#
# The sparse embedding only needs, for each text and each vocabulary entry, the largest weight of
# that token in the text: a (passages x vocabulary) result. m3lab's `efficient_sparse_head`
# (`m3lab.sparse_head`, a subclass of FlagEmbedding's model) scatter-reduces straight into it, as
# FlagEmbedding's own eval branch does, and zeroes the special tokens out of place, which is what
# broke upstream's attempt to do the same in training (PR #1425). Same loss and gradients (tested on
# the stand-in); the command becomes `torchrun -m m3lab.run_m3 ... --efficient_sparse_head True`.

# %%
lean = lessons.predict_all({"example 8192, efficient head": example_8192.replace(efficient_sparse_head=True),
                            "example 512, efficient head": TrainConfig.upstream_example(efficient_sparse_head=True)})

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(lean))

# %% [markdown]
# Without the (passages x tokens x vocabulary) tensor, FlagEmbedding's example at its default 512
# tokens goes from OOM to a close call (the optimizer step's 12.7 GiB is then the peak), and at
# 8,192 tokens from 137 to about 20 GiB: still too much for a T4, now in the encoder's activations and
# the loss's temporaries. The next lessons take the common advice knob by knob.


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: the peak of live tensors,
# and the total with the allocator's cache and the CUDA context (both estimates; the cache estimate
# is capped at the card while the live tensors fit, which is why a close call reads 14.74). This
# lesson's steps and the flags they change in the command, then the whole path so far:

# %%
so_far = ledger.predict_path("01")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("01")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far);

# %% [markdown]
# **In one line.** FlagEmbedding's example on one T4, passages at BGE-M3's 8,192 tokens: 136.60 GiB
# peak, OOM by 122.26 GiB, predicted; what fills the card is the sparse head's (passages x tokens x
# vocabulary) tensor, not the weights.
