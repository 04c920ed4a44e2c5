"""bench/cuda_check.py runs only on a GPU machine; its checks are plain functions of a device, so CPU CI
runs them here (the GPU run adds nothing but the device), and a broken check shows up before a GPU lease."""
import torch

from tests.conftest import load_bench


def test_cuda_check_passes_on_cpu(tmp_path):
    check = load_bench("cuda_check")
    cpu = torch.device("cpu")
    for fn in (check.forward_check, check.mixed_check, check.generate_check, check.fast_decode_check, check.trees_check):
        fn(cpu)
    check.train_checks(cpu, tmp_path)
    assert set(check.RESULTS) == {"forward", "mixed", "generate", "fast_decode", "trees", "sft", "dpo", "grpo"}
    assert all(r["pass"] for r in check.RESULTS.values()), check.RESULTS
    assert check.RESULTS["sft"]["last_loss"] < check.RESULTS["sft"]["first_loss"]


def test_fast_decode_check_passes_on_cpu():
    """The fast decoder's check (static cache and the static-shape step the CUDA graph captures) on CPU."""
    check = load_bench("cuda_check")
    check.fast_decode_check(torch.device("cpu"))
    assert check.RESULTS["fast_decode"]["pass"], check.RESULTS["fast_decode"]
    assert set(check.RESULTS["fast_decode"]) == {"pass", "fp32", "fixed_eager"}
