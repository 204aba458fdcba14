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
# # 02 · Shorter max lengths
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/02_shorter_lengths.ipynb)
#
# The first piece of common advice: cut `query_max_len`/`passage_max_len` (e.g. 64/392). How does
# peak memory move with each, and what does the cut cost in text?
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
base = TrainConfig.upstream_example(query_max_len=64)
passage_lengths = [128, 256, 392, 512, 1024, 2048, 4096, 8192]
passage_configs = {f"passage {p}": base.replace(passage_max_len=p) for p in passage_lengths}
by_passage = lessons.predict_all(passage_configs)
query_lengths = [32, 64, 128, 256, 512]
query_configs = {f"query {q}": base.replace(query_max_len=q, passage_max_len=392) for q in query_lengths}
by_query = lessons.predict_all(query_configs)

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(by_passage))
print()
print(lessons.prediction_table(by_query))

# %%
plots.memory_curve(passage_lengths, list(by_passage.values()), "passage_max_len (tokens)", log_x=True,
                   title="FlagEmbedding's example (query 64), peak memory vs passage length");

# %%
from m3lab.data.jsonl import load_jsonl, token_length_stats

tokenizer, tokenizer_name = lessons.load_tokenizer()
records = load_jsonl("data/train.jsonl")
cut = {p: {s.field: s for s in token_length_stats(records, tokenizer, passage_max_len=p)}["passage"]
       for p in passage_lengths}

# %%
# NBVAL_CHECK_OUTPUT

print(f"tokenizer: {tokenizer_name}")
print(f"{'passage_max_len':>15} {'passages cut':>13} {'tokens cut':>11}  predicted peak (T4)")
for p in passage_lengths:
    report = by_passage[f"passage {p}"]
    print(f"{p:15} {cut[p].truncated_share:13.1%} {cut[p].truncated_token_share:11.1%}  "
          f"{report.peak_allocated_bytes / GIB:6.2f} GiB, {report.short_verdict}")

# %%
# Every configuration above as the flags to change in your copy of the command (--deepspeed
# names the JSON that config.deepspeed_json() prints, written beside the command)
lessons.print_commands({**passage_configs, **query_configs}, "02")

# %% [markdown]
# **What it shows.** Passage length is the strong knob while the sparse head's (passages x tokens x
# vocabulary) tensor makes the peak: from 8,192 down to 512 tokens the peak falls from 136.54 to
# 15.54 GiB, still out of memory by 5.08 GiB. The advice's 392 peaks at 13.64 GiB and is out of
# memory too, by 2.40: the sparse head's big requests find PyTorch's cache of freed memory cut into pieces too small for
# them, and the step needs 17.14 GiB of the card. At 256 and below the peak is flat at 12.71 GiB, because it is now
# the optimizer step (ZeRO-0: fp32 master weights, Adam moments and their update temporaries), which
# no length changes. There 256 fits, with 0.71 GiB to spare, and 128, whose blocks land worse, does
# not (short by 0.51): near the card's limit where those unusable pieces fall decides, which is why every
# verdict counts them. So the advice's 392 is not the knee; 256 is, at the price of more text cut (52.0% of
# passage tokens instead of 42.1%, counted with the tokenizer printed above, the stand-in's when
# offline). Query length hardly matters (13.64 to 13.70 GiB from 32 to 512 tokens): queries are one
# text per group.


# %% [markdown]
# ## FlagEmbedding's own `--sub_batch_size`
#
# FlagEmbedding 1.4.2 has a knob that goes at the same tensor without cutting text: `--sub_batch_size
# N` encodes the queries and passages N at a time. Every chunk's graph is kept for backward, so the
# encoder's activations do not shrink, but the sparse head's (passages x tokens x vocabulary) tensor
# is made one chunk at a time. The same example, with `--sub_batch_size 1`, by passage length:

# %%
by_sub_batch = lessons.predict_all({f"passage {p}, --sub_batch_size 1": base.replace(passage_max_len=p, sub_batch_size=1)
                                    for p in passage_lengths})

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(by_sub_batch))
print()
print(f"{'passage_max_len':>15}  peak as shipped -> with --sub_batch_size 1 (predicted for a T4)")
for p, with_chunks in zip(passage_lengths, by_sub_batch.values()):
    print(f"{p:15}  {by_passage[f'passage {p}'].peak_allocated_bytes / GIB:7.2f} -> "
          f"{with_chunks.peak_allocated_bytes / GIB:6.2f} GiB, {with_chunks.short_verdict}")

# %%
plots.memory_curve(passage_lengths, list(by_passage.values()), "passage_max_len (tokens)", log_x=True,
                   label="as shipped", compare={"--sub_batch_size 1": list(by_sub_batch.values())},
                   title="FlagEmbedding's example (query 64), with and without --sub_batch_size 1");

# %% [markdown]
# **What it shows.** Where the sparse head's tensor makes the peak, one passage at a time takes it
# away: from 392 up to 2,048 tokens the peak falls to the optimizer step's floor, 12.71 GiB (at 2,048
# from 39.74), but with the cache's unusable pieces each of them is out of memory by about half a GiB, like
# the example's own 128; at 4,096 and 8,192 the encoder's own activations are left (15.98 and 23.44
# GiB). On paper that is five times the text of the advice's 392 for a lower peak. Two catches keep it
# out of the path: with unified fine-tuning (the example's dense + sparse + ColBERT) FlagEmbedding
# 1.4.2 concatenates the chunks' ColBERT vectors, which fails as soon as two chunks are padded to
# different lengths, as real data makes them (lesson 07 runs it and shows the error); and these
# figures assume every chunk padded to the full length. Lesson 08's efficient sparse head does the
# same job inside one batch, without chunks.


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.plan.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: each bar is the peak of
# live tensors after the step, coloured by the verdict, and the mark above it what the step needs
# of the card. This lesson's steps and the flags they change in the command, then the whole path
# so far:

# %%
from m3lab.plan import ledger

so_far = ledger.predict_path("02")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("02")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("02")));

# %% [markdown]
# **In one line.** Cutting to 64/392 tokens takes the peak from 136.60 to 13.64 GiB, and the run is
# still out of memory, by 2.40 GiB, predicted for a T4.
#
# A cut length throws text away (the table above says how much of this data's). Lesson 07 ends
# with the other way, the way BGE-M3's authors trained: the data split by length, each part batched
# at what the card holds, nothing cut.
