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
# # 00 · Setup and data
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/00_setup_and_data.ipynb)
#
# The series fine-tunes BGE-M3 with FlagEmbedding's own trainer
# (`torchrun -m FlagEmbedding.finetune.embedder.encoder_only.m3`). Before any memory question:
# what machine is this, what does the training data look like, is it valid, and how long are its texts?
# The last question decides `query_max_len` and `passage_max_len`, the first knobs of lesson 02.
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

# %% [markdown]
# ## The data format
#
# FlagEmbedding reads JSON lines: one query per line, a list of positive passages (`pos`) and a list
# of hard negatives (`neg`); optional `pos_scores`/`neg_scores` for distillation, `prompt` and `type`.
# Each training step samples one positive and `train_group_size - 1` negatives per query. The sample
# in `data/` has 251 training queries and 50 held-out ones over 303 passages in five languages
# (see `data/README.md` for where the text comes from).

# %%
# NBVAL_CHECK_OUTPUT

import json
from m3lab.data.jsonl import load_jsonl, resolve_data_path

first = json.loads(resolve_data_path("data/train.jsonl").read_text(encoding="utf-8").splitlines()[0])
print(json.dumps({k: (v[:70] + "..." if isinstance(v, str) else [t[:50] + "..." for t in v[:2]] + ["..."])
                  for k, v in first.items()}, indent=1, ensure_ascii=False))

# %% [markdown]
# ## Validation
#
# `load_jsonl` checks every line against FlagEmbedding's format and reports **every** bad line as
# `file:line: what is wrong; what to do`, so a broken file fails here, in a second, not twenty
# minutes into a GPU session.

# %%
# NBVAL_CHECK_OUTPUT

train_records = load_jsonl("data/train.jsonl")
held_out = load_jsonl("data/eval.jsonl", need_negatives=False)
print(f"train: {len(train_records)} queries, {sum(len(r['neg']) for r in train_records)} negatives; "
      f"held out: {len(held_out)} queries")

# %%
# NBVAL_CHECK_OUTPUT

# What a broken file looks like (two of the project's test fixtures)
from m3lab.data.jsonl import REPO_ROOT, validate_jsonl

for name in ("06-missing-pos.jsonl", "18-score-not-finite.jsonl"):
    _, problems = validate_jsonl(REPO_ROOT / "tests" / "fixtures" / "bad_data" / name)
    for problem in problems:
        print(str(problem).replace(str(REPO_ROOT) + os.sep, ""))

# %% [markdown]
# ## Token lengths
#
# Memory grows with the number of tokens per text, so the max lengths should cover the data, not a
# guess. Counts below use BGE-M3's tokenizer where the hub is reachable, else the stand-in's
# (trained offline on the same corpus; it splits text into more pieces than BGE-M3's 250k vocabulary
# does, so its counts run higher).

# %%
from m3lab.data.jsonl import length_covering, length_covering_tokens, token_length_stats, token_lengths

tokenizer, tokenizer_name = lessons.load_tokenizer()
stats = token_length_stats(train_records, tokenizer, query_max_len=64, passage_max_len=392)
print("tokenizer:", tokenizer_name)

# %%
# NBVAL_CHECK_OUTPUT

print(f"{'field':8} {'texts':>5} {'p50':>5} {'p90':>5} {'p95':>5} {'p99':>5} {'max':>6}  cut at max_len")
for s in stats:
    print(f"{s.field:8} {s.count:5} {s.p50:5} {s.p90:5} {s.p95:5} {s.p99:5} {s.max:6}  "
          f"{s.truncated_share:5.1%} of texts, {s.truncated_token_share:5.1%} of tokens beyond {s.max_len}")
by_field = {s.field: s for s in stats}
print(f"max lengths that keep 95% of texts whole: query {length_covering(by_field['query'])}, "
      f"passage {length_covering(by_field['passage'])}")
passages = list(dict.fromkeys(t for r in train_records for t in r["pos"] + r["neg"]))
query_tokens = token_lengths([r["query"] for r in train_records], tokenizer)
print(f"max lengths that keep 95% of tokens (m3lab fit's passage length): query {length_covering_tokens(query_tokens)}, "
      f"passage {length_covering_tokens(token_lengths(passages, tokenizer))}")
print(f"every query whole (the answers' query length, where the run still fits): {length_covering_tokens(query_tokens, 1.0)}")

# %%
plots.token_length_histogram({"query": token_lengths([r["query"] for r in train_records], tokenizer).tolist(),
                              "passage": token_lengths(passages, tokenizer).tolist()},
                             max_lens={"query": 64, "passage": 392}, tokenizer_name=tokenizer_name);

# %% [markdown]
# **Reading it.** Token counts come from the tokenizer printed above: BGE-M3's own where the hub
# answers (Colab, or Kaggle with its internet on), else the stand-in's, whose counts run higher; the
# committed outputs were made offline, with the stand-in's. Queries are short: 64 tokens keeps nearly all of them whole. Passages are
# long-tailed: the common advice's 392 tokens cuts nearly a quarter of the passages (23.3%) and 42.1%
# of passage tokens. Two 95% figures come up in the series, and they differ: the length that keeps 95% of
# the *texts* whole, and the length that keeps 95% of the *tokens*. For passages the second is the longer
# one, and it is the passage length `m3lab fit` takes in lesson 07: long passages hold most of the
# tokens, so keeping their tokens needs more length than keeping most passages whole. Queries are
# different: a query costs little memory (one per group of passages), so the answers keep every query
# whole where the run still fits, at the length printed last above (lengths are rounded up to a
# multiple of 8). Lesson 02 shows what each max length costs
# in memory, so the cut can be a decision rather than a default.
