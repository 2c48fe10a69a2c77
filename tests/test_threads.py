"""Fused layers called from several Python threads at once.

Four threads share one eval model (so they share the oneDNN folded-weight cache, the backend
resolution cache and the extension's state) while four others train their own copies; every
result must equal the same call made on one thread, and no thread may hang (each is joined
with a timeout). The caches stay within their bounds: ``resnet_fast.backends.cache_sizes``.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from resnet_fast import backends, dispatch, folded_weights, models

THREADS = 4
JOIN_TIMEOUT_S = 300

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=3,
                         small_input=True).to(memory_format=torch.channels_last)


def _inputs(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(2 + i % 2, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 3, (x.shape[0],), generator=g)


def _train_steps(model: torch.nn.Module, i: int, steps: int = 2) -> dict[str, torch.Tensor]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, target = _inputs(i)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_threads(target, n: int) -> list:
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = target(i)
        except BaseException as exc:  # reported on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock?"
    if errors:
        raise errors[0]
    return results


def test_eval_and_training_from_threads_match_one_thread():
    shared = _model().eval()
    trainees = [copy.deepcopy(_model()) for _ in range(THREADS)]
    with torch.no_grad():
        expected_eval = [shared(_inputs(i)[0]) for i in range(THREADS)]
    expected_train = [_train_steps(copy.deepcopy(_model()), i) for i in range(THREADS)]

    def job(i):
        if i < THREADS:  # eval on the shared model, several calls each
            with torch.no_grad():
                return [shared(_inputs(i)[0]) for _ in range(5)]
        return _train_steps(trainees[i - THREADS], i - THREADS)

    results = _run_threads(job, 2 * THREADS)
    for i in range(THREADS):
        for out in results[i]:
            assert torch.equal(out, expected_eval[i]), f"eval thread {i}"
        state = results[THREADS + i]
        for name, value in expected_train[i].items():
            assert torch.equal(state[name], value), f"training thread {i}: {name}"
    sizes = backends.cache_sizes()
    assert 0 < sizes["onednn_folded_weights"] <= folded_weights.CACHE_SIZE
    assert sizes["resolved_backends"] <= 64
    assert 0 < sizes["decided_call_sites"] <= dispatch._DECIDED_SIZE


def test_onednn_cache_evicts_past_its_bound(monkeypatch):
    """More live eval convs than the bound: the cache keeps the most recent ones, and every call
    still gives the same result as before eviction."""
    monkeypatch.setattr(folded_weights, "CACHE_SIZE", 4)
    model = _model().eval()
    x = _inputs(0)[0]
    with torch.no_grad():
        first = model(x)
        assert folded_weights.size() <= 4
        assert torch.equal(model(x), first)
