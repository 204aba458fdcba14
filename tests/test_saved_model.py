"""The fine-tuned folder in sentence-transformers: BGE-M3's dense vectors with the module files, other
vectors without them (FlagEmbedding 1.4.2 does not write them: held, so that an upstream fix shows)."""

import shutil

import numpy as np
import pytest

from m3lab.train.saved_model import write_sentence_transformers_files

TEXTS = ["what does the memory of a T4 hold?", "a passage about gradient checkpointing and activations",
         "short"]


@pytest.fixture(scope="module")
def dense_and_folder(standin_dir, tmp_path_factory):
    """A copy of a BGE-M3 folder as FlagEmbedding saves it, and BGEM3FlagModel's dense vectors of TEXTS."""
    from FlagEmbedding import BGEM3FlagModel

    folder = tmp_path_factory.mktemp("model") / "bge-m3-finetuned"
    shutil.copytree(standin_dir, folder)
    dense = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu").encode(TEXTS)["dense_vecs"]
    return np.asarray(dense), folder


def test_without_the_module_files_sentence_transformers_pools_otherwise(dense_and_folder):
    from sentence_transformers import SentenceTransformer

    dense, folder = dense_and_folder
    vectors = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    cosines = (vectors * dense).sum(1) / np.linalg.norm(vectors, axis=1)
    assert cosines.min() < 0.99  # mean pooling, unnormalised: not BGE-M3's dense vector


def test_with_them_it_gives_bge_m3s_dense_vectors(dense_and_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    dense, saved = dense_and_folder
    folder = tmp_path / "with-files"
    shutil.copytree(saved, folder)
    written = write_sentence_transformers_files(folder)
    assert {p.name for p in written} == {"modules.json", "config.json", "sentence_bert_config.json", "2_Normalize"}
    vectors = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(vectors, dense, atol=1e-5)
    # FlagEmbedding still finds its two heads beside them
    assert (folder / "colbert_linear.pt").exists() and (folder / "sparse_linear.pt").exists()


def test_the_command_line_writes_them_or_says_what_to_give_it(dense_and_folder, tmp_path):
    import subprocess
    import sys

    _, saved = dense_and_folder
    folder = tmp_path / "out"
    shutil.copytree(saved, folder)
    done = subprocess.run([sys.executable, "-m", "m3lab.train.saved_model", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0 and (folder / "modules.json").exists() and (folder / "1_Pooling" / "config.json").exists()
    wrong = subprocess.run([sys.executable, "-m", "m3lab.train.saved_model", str(tmp_path)], capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and wrong.stderr.startswith("m3lab: give the folder a run saved its model in")
    assert "Traceback" not in wrong.stderr
