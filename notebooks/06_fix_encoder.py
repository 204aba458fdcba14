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
# # 06 · fix_encoder
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/06_fix_encoder.ipynb)
#
# `fix_encoder` is often suggested as the last resort: train only the sparse and ColBERT heads. What
# does it train, what does it leave out, and what does it save?
#
# *Every memory figure below says where it comes from: **measured on &lt;device&gt;** or **predicted for &lt;GPU&gt;**. On a CPU (and in CI) full-size figures are predicted by `m3lab.predict`, which runs FlagEmbedding's real training step on placeholder tensors (shapes and sizes, no numbers in them), and real runs use `tiny-bge-m3`, an offline stand-in with BGE-M3's architecture at toy size. On a Colab or Kaggle GPU the same cells measure the real `BAAI/bge-m3`. In the tables, *peak alloc* is the most memory the step's tensors hold at one moment. *needs* is what the step takes of the card, which is more: PyTorch keeps the memory of freed tensors in a cache to reuse it, and the cache ends up cut into pieces too small for some later, larger tensor, so the card must hold the tensors and those unusable pieces at once; *needs* is that sum at the step's tightest moment, plus the memory CUDA itself takes on the card (an estimate). The verdict's *spare* is the card's usable memory minus *needs*; lesson 01 says how the verdict is made and how far the measurements back it.*

# %%
# Colab / Kaggle: fetch m3lab (code and data) and install it on top of the runtime. m3lab asks for
# ranges that hold the versions Colab and Kaggle ship (torch, transformers, numpy, protobuf, ...), so
# pip only adds what is missing (FlagEmbedding, without its [finetune] extra, which builds flash-attn
# and fails there; DeepSpeed, bitsandbytes and a few small packages) and changes nothing already
# installed: no restart needed. Where m3lab is installed (make test), this does nothing.
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
from m3lab import lessons
from m3lab.config import TrainConfig
from m3lab.gpus import GIB
from m3lab.lessons import plots

env = lessons.environment()
print(env.describe())
print(", ".join(f"{name} {version}" for name, version in lessons.versions().items()))

# %%
# NBVAL_CHECK_OUTPUT

from m3lab.predict import model_for

def parameters(config):
    model = model_for(config)  # the full-size model on the meta device: no memory
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    return sum(p.numel() for p in model.parameters()), trainable

total, trainable = parameters(TrainConfig.common_t4_advice())
print(f"fix_encoder off: {sum(trainable.values()):,} of {total:,} parameters train")
total, trainable = parameters(TrainConfig.common_t4_advice(fix_encoder=True))
print(f"fix_encoder on:  {sum(trainable.values()):,} of {total:,} parameters train:")
for name, count in trainable.items():
    print(f"    {name}: {count:,}")

# %% [markdown]
# Only `colbert_linear` and `sparse_linear` train. The **dense** embedding is the CLS vector of the
# encoder itself, with no head of its own, so with the encoder frozen the dense retrieval of the
# model does not change at all: a fine-tuning run whose most used output stays exactly as it was.

# %%
from m3lab.plan import ledger

start = ledger.before("06")  # where the path stands: 64/392 tokens, group 6, batch 1, no DeepSpeed
configs = {"the path after lesson 05": start,
           "the path + fix_encoder": start.replace(fix_encoder=True),
           "example 8192 + fix_encoder": TrainConfig.upstream_example(passage_max_len=8192, fix_encoder=True)}
reports = lessons.predict_all(configs)

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(reports))

# %%
plots.breakdown_bars(reports, title="fix_encoder: what is left", **lessons.gpu_measurements(configs));

# %%
# Every configuration above as the flags to change in your copy of the command (--deepspeed
# names the JSON that config.deepspeed_json() prints, written beside the command)
lessons.print_commands(configs, "06")

# %% [markdown]
# ## The first trap: fix_encoder with gradient checkpointing
#
# Gradient checkpointing saves each layer's input and recomputes the layer in backward, to save the
# activations autograd would otherwise keep for the weights' gradients. With the encoder frozen,
# autograd keeps almost nothing inside the encoder (no weight needs a gradient, and nothing before the
# heads needs one either), but checkpointing still saves every layer's input. At 8,192 tokens, with
# FlagEmbedding's own `--sub_batch_size 1` taking the sparse head's tensor down to one passage at a
# time:

# %%
frozen = TrainConfig.upstream_example(passage_max_len=8192, fix_encoder=True, sub_batch_size=1)
ckpt = lessons.predict_all({"8192, fix_encoder, ckpt on": frozen,
                            "8192, fix_encoder, ckpt off": frozen.replace(gradient_checkpointing=False)})

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(ckpt))
for label, report in ckpt.items():
    print(f"{label:30} activations at the peak {report.breakdown['activations'] / GIB:.2f} GiB")

# %% [markdown]
# With checkpointing on (as in FlagEmbedding's example) the frozen encoder's saved inputs are most of
# the activations (7.56 GiB) and the run is out of memory; turned off, they go (0.76 GiB) and the
# peak falls from 16.80 to 9.98 GiB, which fits with 1.29 GiB to spare: with `fix_encoder`, pass
# `--gradient_checkpointing False`. (A prediction for full-length batches: with unified fine-tuning
# FlagEmbedding 1.4.2's `--sub_batch_size` fails on real data whose chunks pad to different lengths,
# lesson 07.)
#
# ## The second trap: fix_encoder without unified_finetuning
#
# With `unified_finetuning` off, FlagEmbedding builds no sparse or ColBERT head (they are `None`),
# so `fix_encoder` leaves nothing to train; the run would start, log a loss and change nothing.
# m3lab refuses it before launch:

# %%
# NBVAL_CHECK_OUTPUT

from m3lab.config import ConfigError

try:
    TrainConfig.common_t4_advice(fix_encoder=True, unified_finetuning=False, use_self_distill=False).check()
except ConfigError as error:
    print(error)

# %% [markdown]
# **Verdict.** `fix_encoder` frees most of the card (where the path stands, the peak falls from 9.42
# to 4.60 GiB: the gradients and optimizer states of 568M parameters go; without DeepSpeed the frozen
# weights stay in fp32), but it is not fine-tuning BGE-M3: the encoder and therefore the dense
# embeddings stay as they were, so the path does not take it. Note also what remains at the peak:
# the sparse head's (passages x tokens x vocabulary) tensor, which is why FlagEmbedding's example at
# 8,192 tokens is still 116.86 GiB short with a frozen encoder; with `--sub_batch_size 1` it fits only
# once gradient checkpointing is off (7.56 against 0.76 GiB of activations at the peak). Use it when
# only the sparse and ColBERT scores need adapting; otherwise see lesson 07.


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.plan.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: each bar is the peak of
# live tensors after the step, coloured by the verdict, and the mark above it what the step needs
# of the card. This lesson's steps and the flags they change in the command, then the whole path
# so far:

# %%
so_far = ledger.predict_path("06")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("06")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("06")));

# %% [markdown]
# **In one line.** fix_encoder takes the peak from 9.42 to 4.60 GiB but leaves the encoder untrained:
# the path does not take it.
