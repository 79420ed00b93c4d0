"""GGUF models under threads: concurrent runs equal sequential runs bit for bit, and scratch memory belongs to its
model (per thread) and goes with it."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from models import load_diffusion_model
from models.io.gguf import QuantizedTensor
from tiny_models.configs import TINY_DIT
from tiny_models.gguf_factory import K_QUANT_DIT, make_dit_gguf


def inputs(config: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=g)
    ctx = torch.randn(1, 8, config["joint_attention_dim"], generator=g)
    return x, torch.tensor([0.4]), ctx


@pytest.fixture
def one_thread_per_op():
    # each op single-threaded, so results cannot depend on how the OpenMP pool is shared between the Python
    # threads (the ops still release the GIL: the threads really interleave)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context_of(model: torch.nn.Module):
    return next(p.context for p in model.parameters() if isinstance(p, QuantizedTensor))


def test_concurrent_runs_equal_sequential_runs(tmp_path: Path, one_thread_per_op):
    models = {"Q4_K": load_diffusion_model(make_dit_gguf(tmp_path, qtype="Q4_K", seed=1, config=K_QUANT_DIT),
                                           dtype=torch.bfloat16),
              "Q8_0": load_diffusion_model(make_dit_gguf(tmp_path, qtype="Q8_0", seed=2, config=TINY_DIT),
                                           dtype=torch.bfloat16)}
    data = {"Q4_K": inputs(K_QUANT_DIT, 3), "Q8_0": inputs(TINY_DIT, 4)}
    with torch.no_grad():
        expected = {name: model(*data[name]) for name, model in models.items()}

    def run(name: str) -> torch.Tensor:
        with torch.no_grad():
            return models[name](*data[name])

    # two models at once, and one model in two threads at once; several rounds to give a race every chance
    jobs = ["Q4_K", "Q8_0"] * 4 + ["Q4_K", "Q4_K"] * 4
    start = threading.Barrier(2)

    def job(name: str) -> torch.Tensor:
        start.wait()
        return run(name)

    with ThreadPoolExecutor(2) as pool:
        for first in range(0, len(jobs), 2):
            futures = [pool.submit(job, name) for name in jobs[first:first + 2]]
            for name, future in zip(jobs[first:first + 2], futures):
                assert torch.equal(future.result(), expected[name]), name


def test_scratch_is_per_thread_and_freed_with_the_model(tmp_path: Path, one_thread_per_op):
    model = load_diffusion_model(make_dit_gguf(tmp_path, qtype="Q5_K", seed=5, config=K_QUANT_DIT),
                                 dtype=torch.bfloat16)
    x, t, ctx = inputs(K_QUANT_DIT, 6)
    context = context_of(model)
    assert all(p.context is context for p in model.parameters() if isinstance(p, QuantizedTensor))
    assert context.scratch_bytes() == 0

    def run_and_watch():
        """Run the model in the calling thread; weak references to what its scratch holds."""
        with torch.no_grad():
            model(x, t, ctx)
        assert context.scratch_bytes() > 0
        largest = max(p.logical_shape.numel() for p in model.parameters() if isinstance(p, QuantizedTensor))
        buffer = context.buffer("weight", largest, torch.empty(0, dtype=torch.bfloat16))
        return weakref.ref(context.workspace()), weakref.ref(buffer._base)

    main = run_and_watch()
    with ThreadPoolExecutor(1) as pool:  # a thread that stays alive while the model goes away
        worker = pool.submit(run_and_watch).result()
        assert main[0]() is not worker[0]() and main[1]() is not worker[1]()  # nothing shared between threads
        assert context.scratch_bytes() > 0  # this thread's own, still held

        ended = threading.Thread(target=lambda: ended_refs.extend(run_and_watch()))
        ended_refs: list[weakref.ref] = []
        ended.start()
        ended.join()
        gc.collect()
        assert all(ref() is None for ref in ended_refs)  # a finished thread's scratch is gone

        alive = weakref.ref(context)
        del model, context
        gc.collect()
        assert alive() is None
        assert all(ref() is None for ref in (*main, *worker))  # every thread's scratch went with the model
