"""The cards m3lab knows, found from the name CUDA gives them (one rule: the environment, the GPU check)."""

import pytest

from m3lab.gpus import identify, is_t4


@pytest.mark.parametrize(("device_name", "key"), [
    ("Tesla T4", "t4"),  # Colab and Kaggle
    ("NVIDIA L4", "l4"),
    ("NVIDIA A10G", "a10g"),
    ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA A100-SXM4-40GB", "a100-40"),
    ("NVIDIA A100-SXM4-80GB", "a100-80"),
    ("NVIDIA A100 80GB PCIe", "a100-80"),
    ("NVIDIA H100 80GB HBM3", "h100"),
])
def test_each_card_is_found_from_its_cuda_name(device_name, key):
    assert identify(device_name).key == key


@pytest.mark.parametrize("device_name", ["NVIDIA H200", "NVIDIA GeForce RTX 4090", "", None])
def test_a_card_without_a_profile_is_none_and_not_a_t4(device_name):
    assert identify(device_name) is None
    assert not is_t4(device_name)


def test_only_a_t4_is_a_t4():
    assert is_t4("Tesla T4")
    assert not is_t4("NVIDIA L4")


def test_a_platforms_card_is_named_without_the_platform_or_the_count():
    from m3lab.gpus import gpu_profile

    assert gpu_profile("t4").card_name == gpu_profile("t4x2").card_name == "Tesla T4"
    assert gpu_profile("l4").card_name == gpu_profile("l4").name
