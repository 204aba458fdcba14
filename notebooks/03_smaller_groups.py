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
# # 03 · Smaller groups and batches
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/03_smaller_groups.ipynb)
#
# Next piece of advice: a smaller `train_group_size` (e.g. 6) and per-device batch 1; and
# `negatives_cross_device` off. What do they change, and what does `same_dataset_within_batch` do?
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
base = TrainConfig.upstream_example(query_max_len=64, passage_max_len=392)
groups = [2, 4, 6, 8, 16]
group_configs = {f"group {g}, batch 2": base.replace(train_group_size=g) for g in groups}
by_group = lessons.predict_all(group_configs)
batches = [1, 2, 4]
batch_configs = {f"group 6, batch {b}": base.replace(train_group_size=6, per_device_train_batch_size=b)
                 for b in batches}
by_batch = lessons.predict_all(batch_configs)

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(by_group))
print()
print(lessons.prediction_table(by_batch))

# %%
plots.memory_curve(groups, list(by_group.values()), "train_group_size (1 positive + negatives per query)",
                   title="Peak memory vs group size (example settings, 64/392, batch 2)");

# %% [markdown]
# ## negatives_cross_device
#
# It shares every GPU's passages as extra negatives for every other GPU's queries (an all-gather).
# On one GPU there is nothing to share; m3lab refuses the flag there rather than let it silently do
# nothing. On Kaggle's 2 x T4 it is real, and the prediction below shows its cost per GPU
# (ZeRO-1, the common advice otherwise).

# %%
# NBVAL_CHECK_OUTPUT

from m3lab.config import ConfigError

try:
    TrainConfig.common_t4_advice(negatives_cross_device=True).check()
except ConfigError as error:
    print(error)

# %%
two = TrainConfig.common_t4_advice(num_processes=2)
cross_configs = {"2 x T4, cross-device off": two, "2 x T4, cross-device on": two.replace(negatives_cross_device=True)}
cross = lessons.predict_all(cross_configs)

# %%
# NBVAL_CHECK_OUTPUT
print(lessons.prediction_table(cross))

# %%
# Every configuration above as the flags to change in your copy of the command (--deepspeed
# names the JSON that config.deepspeed_json() prints, written beside the command)
lessons.print_commands({**group_configs, **batch_configs, **cross_configs}, "03")

# %% [markdown]
# ## same_dataset_within_batch
#
# It makes every batch come from one training file (one `dataset`), so that in-batch negatives are of
# the same kind. It changes **which** texts share a batch, never how many or how long they may be: the
# tensors of a step have the same shapes, and the predicted peak is the same. With one training file,
# as here, it changes nothing at all. To see what it does, this series' training file split in two (the
# records whose longest passage has the fewest characters in `short.jsonl`, the rest in `long.jsonl`) and the first
# batches of 4 queries that FlagEmbedding's own data loading draws from them, with the flag off and
# on, seeded as its trainer seeds it:

# %%
import json
import tempfile
from pathlib import Path

from m3lab.data import batching
from m3lab.data.jsonl import REPO_ROOT, load_jsonl

tokenizer, tokenizer_name = lessons.load_tokenizer()
records = load_jsonl(REPO_ROOT / "data" / "train.jsonl")
longest = [max(len(text) for text in r["pos"] + r["neg"]) for r in records]  # characters: any tokenizer agrees
cut = sorted(longest)[len(longest) // 2]
split = Path(tempfile.mkdtemp(prefix="m3lab-03-"))
for name, keep in (("short.jsonl", lambda n: n < cut), ("long.jsonl", lambda n: n >= cut)):
    (split / name).write_text("".join(json.dumps(r) + "\n" for r, n in zip(records, longest) if keep(n)))
files = [split / "short.jsonl", split / "long.jsonl"]
drawn = {same: batching.sample_batches(files, tokenizer, same_dataset=same, batch_size=4, count=6)
         for same in (False, True)}

# %%
# NBVAL_CHECK_OUTPUT
for same, batches in drawn.items():
    print(f"--same_dataset_within_batch {same}:")
    for number, batch in enumerate(batches, 1):
        print(f"  batch {number}: " + ", ".join(f"{n} from {name}" for name, n in sorted(batch.files.items())))

# %%
# what each batch pads its passages to (tokens, with this tokenizer; FlagEmbedding pads a batch to its longest text)
print(tokenizer_name)
for same, batches in drawn.items():
    print(f"--same_dataset_within_batch {same}: " + ", ".join(str(b.longest_passage) for b in batches))

# %% [markdown]
# Without the flag, batches mix the files, and one long passage makes the whole batch long. With it,
# a batch is all short or all long: the short ones pad less, so the typical step is cheaper. The
# **peak** is set by the longest texts `--passage_max_len` lets in, and stays.
#
# **A trap in FlagEmbedding 1.4.2.** With the flag on, its dataset formats every query with the query
# instruction even when you give none: `"{}{}".format(None, query)`. Every query is then trained with
# the text `None` in front of it, and scored later without it. The same query, as each path hands it
# to the model:

# %%
# NBVAL_CHECK_OUTPUT
query = json.loads(files[0].read_text().splitlines()[0])["query"]
for same, instruction in ((False, None), (True, None), (True, "")):
    flags = f"--same_dataset_within_batch {same}" + ("" if instruction is None else " --query_instruction_for_retrieval ''")
    trained = batching.query_as_trained(files[:1], tokenizer, same_dataset=same, first_query=query,
                                        instruction=instruction)
    print(f"{flags:70} {trained[:60]!r}")

# %% [markdown]
# So: with one training file, leave `--same_dataset_within_batch` off (FlagEmbedding's default, and
# what its own `m3.sh` does); with several, add `--query_instruction_for_retrieval ''`.
# `m3lab predict -- <command>` prints this note when a pasted command has the flag without an
# instruction. The path keeps it off.
#
# **Verdict.** Group size and batch scale the sparse head's tensor and the activations (passages per
# step = batch x group): a real lever while those make the peak, as at group 16 or batch 4. At 392
# tokens, from group 6 down (12 passages per step), the peak is the optimizer step, 12.71 GiB, and a
# smaller group does not lower it: what still differs is where the allocator's gaps fall. Group 6 at
# batch 2 fits with 0.05 GiB to spare (a close call), group 2 is out of memory by 0.51 GiB, and
# group 6 at batch 1 fits with 0.52 to spare. Group 2 trains one negative per query where group 6
# trains five. `negatives_cross_device` costs nothing visible on 2 x T4 (6.86 GiB to spare either
# way): what it gathers (the other GPU's dense, sparse and ColBERT vectors of a dozen passages) is
# megabytes, next to gigabytes of model states.


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

so_far = ledger.predict_path("03")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("03")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("03")));

# %% [markdown]
# **In one line.** Group 6 and batch 1 take the peak to 12.71 GiB, and the run fits, with 0.52 GiB
# to spare, predicted for a T4; at 392 tokens the optimizer step is the peak, and smaller groups buy
# nothing more.
