"""DistributedDataParallel: 2 gloo processes on CPU, fused attention, gradients equal to one process."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F


def _build():
    from perceiver_fast.models import Perceiver

    return Perceiver(image_size=8, patch_size=4, in_channels=1, num_classes=3, num_latents=2, latent_dim=8,
                     self_heads=2, depth=1, attention="fused")


def _worker(rank, world, rendezvous, init_path, data_path, out_path):
    torch.set_num_threads(1)
    # File rendezvous: no TCP port to race for with other test runs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _build()
        model.load_state_dict(torch.load(init_path, weights_only=True))
        ddp = DDP(model)
        x, y = torch.load(data_path, weights_only=True)
        half = x.shape[0] // world
        loss = F.cross_entropy(ddp(x[rank * half:(rank + 1) * half]), y[rank * half:(rank + 1) * half])
        loss.backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(torch.stack(gathered), out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_process_gloo_matches_single_process(tmp_path):
    torch.manual_seed(0)
    model = _build()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    init, data, out = tmp_path / "init.pt", tmp_path / "data.pt", tmp_path / "grads.pt"
    torch.save(model.state_dict(), init)
    torch.save((x, y), data)
    # TRITON_INTERPRET (set by conftest) is inherited by the spawned workers.
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(init), str(data), str(out)), nprocs=2, join=True)
    grads = torch.load(out, weights_only=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # identical on both ranks
    F.cross_entropy(model(x), y).backward()
    single = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[0], single, rtol=1e-4, atol=1e-6)
