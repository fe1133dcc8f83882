"""A patched Transformers model under DDP on two gloo ranks, with gradient accumulation: the
step's gradients equal those of the unpatched model's mean loss over the whole step's tokens,
when each micro-batch passes ``num_items_in_batch = global_valid_count(...) / world_size``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

V = 64
WORLD = 2
MICRO = 2  # micro-batches per rank


def _model() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    model.config.use_cache = False
    return model


def _step_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """WORLD * MICRO micro-batches of (ids, labels), with -100 padding of varying length."""
    g = torch.Generator().manual_seed(5)
    out = []
    for k in range(WORLD * MICRO):
        ids = torch.randint(3, V, (2, 9), generator=g)
        labels = ids.clone()
        labels[0, 9 - 2 * k - 1 :] = -100  # a different number of valid tokens in each
        out.append((ids, labels))
    return out


def _worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        import crossent.integrations.transformers as ct
        from crossent.distributed import global_valid_count

        data = _step_data()
        # the reference: the unpatched model, one mean over every shifted token of the step
        ref = _model()
        total = sum(F.cross_entropy(ref(input_ids=i).logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1),
                                    reduction="sum") for i, y in data)
        n_all = sum(int((y[:, 1:] != -100).sum()) for _, y in data)
        (total / n_all).backward()
        want = {n: p.grad.clone() for n, p in ref.named_parameters()}

        model = ct.patch(_model())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mine = data[rank * MICRO : (rank + 1) * MICRO]
        n = global_valid_count([y[:, 1:] for _, y in mine])
        assert int(n) == n_all
        for k, (ids, labels) in enumerate(mine):
            ctx = ddp.no_sync() if k < MICRO - 1 else contextlib.nullcontext()
            with ctx:
                out = ddp(input_ids=ids, labels=labels, num_items_in_batch=n / WORLD)
                out.loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, n=name: f"{n}: {m}")
        # both ranks done before either tears its group down: a rank whose peer closed the
        # connection under gloo's threads can abort at exit ("terminate called without an
        # active exception", seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_patched_model_under_ddp_with_accumulation(tmp_path: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}",), nprocs=WORLD, join=True)
