"""The one place m3lab patches third-party internals: every target exists in the installed
versions (CI's lock and the Colab lane run this), and a missing one is an error, not a no-op."""

import pytest
import torch

from m3lab import compat


def test_every_patched_target_exists_in_the_installed_versions():
    compat.check_targets()


def test_a_target_that_moved_is_an_error_naming_it(monkeypatch):
    import importlib

    # by its full name: ``deepspeed.comm.torch`` as an attribute is torch itself
    monkeypatch.delattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op")
    with pytest.raises(compat.CompatError, match="deepspeed.comm.torch.build_shm_op no longer exists"):
        compat.check_targets()
    with pytest.raises(compat.CompatError):
        with compat.no_shared_memory_comm():
            pass


def test_patches_apply_and_are_undone():
    original = torch.nn.functional.scaled_dot_product_attention
    with compat.gpu_attention_kernel(lambda *args, **kwargs: "emulated"):
        assert torch.nn.functional.scaled_dot_product_attention() == "emulated"
    assert torch.nn.functional.scaled_dot_product_attention is original


def test_full_length_inputs_get_no_attention_mask_on_this_transformers_major():
    """Under fake tensors transformers must not build a (B, 1, L, L) mask for full-length inputs:
    on transformers 5 it would, believing it is being traced, unless the patch applies."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=520, attn_implementation="sdpa")
    masks = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    with compat.gpu_attention_kernel(spy), compat.full_length_attention_masks(config), FakeTensorMode():
        model = XLMRobertaModel(config)
        ids = torch.ones(2, 512, dtype=torch.long)
        model(input_ids=ids, attention_mask=torch.ones(2, 512, dtype=torch.long))
    assert masks == [None]


def test_an_attribute_deepspeed_stops_assigning_is_an_error(monkeypatch):
    """m3lab reads some DeepSpeed optimizers' instance attributes (fp32 masters, gradient buckets): a
    rename in DeepSpeed's code would quietly mislabel memory, so the registry checks the assignment."""
    import inspect

    real = inspect.getsource

    def renamed(obj):
        return real(obj).replace("self.single_partition_of_fp32_groups", "self.fp32_partitions")

    monkeypatch.setattr(inspect, "getsource", renamed)
    with pytest.raises(compat.CompatError, match="no longer assigns self.single_partition_of_fp32_groups"):
        compat.check_targets()


def _defined_here(cls) -> set[str]:
    return {name for name, value in vars(cls).items() if callable(value) or isinstance(value, classmethod)}


def test_every_override_of_a_third_party_method_is_in_the_registry():
    """m3lab's subclasses of FlagEmbedding's model and of torch's dispatch modes: each method they
    override is a registered target, so a rename upstream cannot leave an override silently unused."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from torch.utils._python_dispatch import TorchDispatchMode

    from m3lab.predict.trace import MemoryTrace
    from m3lab.train.grad_cache import GradCacheM3Model
    from m3lab.train.sparse_head import EfficientSparseM3Model

    registered = {target.attribute for target in compat.TARGETS if target.reach is compat.Reach.OVERRIDDEN}
    for ours, theirs in ((EfficientSparseM3Model, EncoderOnlyEmbedderM3Model),
                         (GradCacheM3Model, EncoderOnlyEmbedderM3Model), (MemoryTrace, TorchDispatchMode)):
        overridden = {name for name in _defined_here(ours) if hasattr(theirs, name) and not name.startswith("__")}
        assert {f"{theirs.__name__}.{name}" for name in overridden} <= registered, ours


def test_deepspeeds_strict_sections_are_read_from_deepspeed():
    sections = compat.deepspeed_strict_sections()
    assert sections["bf16"] == {"enabled", "immediate_grad_update", "check_grad_overflow",
                                "bf16_master_weights_and_grads", "bf16_optimizer_states"}
    assert {"loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= sections["fp16"]


def _m3lab_sources():
    from pathlib import Path

    root = Path(compat.__file__).parent
    return {".".join(path.relative_to(root).with_suffix("").parts): path.read_text()
            for path in root.rglob("*.py")}


def test_every_target_names_the_module_that_reaches_it():
    sources = _m3lab_sources()
    for target in compat.TARGETS:
        user = target.user if target.user in sources else f"{target.user}.__init__"
        assert user in sources, f"{target} names m3lab.{target.user}, which does not exist"
        assert target.attribute.rsplit(".", 1)[-1] in sources[user] + sources["compat"], target


def test_every_name_imported_from_a_private_module_is_in_the_registry():
    """A private module (a dotted part starting with an underscore) can change in any release: each
    name m3lab imports from one is a target, so check_targets walks it on every stack."""
    import ast

    registered = {(target.module, target.attribute.split(".")[0]) for target in compat.TARGETS}
    unregistered = []
    for module, source in _m3lab_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module != "__future__" \
                    and any(part.startswith("_") for part in node.module.split(".")):
                unregistered += [f"{node.module}.{alias.name} (m3lab.{module})" for alias in node.names
                                 if (node.module, alias.name) not in registered]
    assert not unregistered, unregistered
