"""The real pretrained encoder behind the committed before/after, and the file itself."""

import importlib.util
import json

import pytest

from m3lab.config import TrainConfig
from m3lab.evidence import real_quality

needs_the_encoder = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                       reason="the pretrained encoder is in m3lab's dev extra, not a runtime dependency")


@needs_the_encoder
def test_the_encoder_is_the_pinned_weights_with_an_end_of_sequence_token(tmp_path):
    folder = real_quality.pretrained_encoder(cache=tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((folder / name).read_text())["eos_token"] == "[SEP]"
    (folder / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(real_quality.ConfigError, match="not the pinned"):
        real_quality.pretrained_encoder(cache=tmp_path)


COMMITTED = {real_quality.OUT: real_quality.RECIPE,
             real_quality.lora_out(5e-5): real_quality.lora_recipe(5e-5),
             real_quality.lora_out(5e-4): real_quality.lora_recipe(5e-4)}


@pytest.mark.parametrize("path", list(COMMITTED), ids=lambda path: path.stem)
def test_the_committed_result_is_labelled_and_was_made_with_todays_recipe(path):
    measured = real_quality.committed(path)
    assert measured.provenance.startswith("measured on CPU") and "all-MiniLM-L6-v2" in measured.provenance
    assert measured.provenance.endswith("not BGE-M3")
    saved = json.loads(real_quality.resolve_data_path(path).read_text())
    recipe = json.loads(json.dumps({k: v for k, v in COMMITTED[path].to_dict().items()
                                    if k not in ("model", "train_data")}))
    rerun = f"the recipe changed: run {saved['command']}"
    # a setting added since the run was made is at its default in the recipe (it changes nothing that ran)
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    assert {k: v for k, v in recipe.items() if k not in saved["recipe"]} == \
        {k: defaults[k] for k in recipe if k not in saved["recipe"]}, rerun
    assert {k: v for k, v in recipe.items() if k in saved["recipe"]} == saved["recipe"], rerun
    assert measured.before.queries == measured.after.queries == 50 and measured.steps > 0 and saved["losses"]
