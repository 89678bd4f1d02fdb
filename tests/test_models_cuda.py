"""GPU-only model checks (skipped without CUDA): bf16 fused vs eager, CUDA-graph capture, patched HF on the GPU."""
import copy

import pytest
import torch

from helpers import GPU_MARKS, TINY, images


pytestmark = GPU_MARKS


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_autocast_fused_matches_eager_on_gpu(name):
    fused = TINY[name](attention="fused").cuda().eval()
    eager = TINY[name](attention="eager").cuda().eval()
    eager.load_state_dict(fused.state_dict())
    x = images(name, b=4).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = fused(x), eager(x)
    torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x).float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["perceiver-io-fourier", "perceiver-io-learned", "vit"])
def test_cuda_graph_capture_and_replay(name):
    model = TINY[name](attention="fused").cuda().eval()
    static_x = images(name, b=4).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up: compiles the kernels, fills caches
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = model(static_x)
    new_x = images(name, b=4).cuda()
    static_x.copy_(new_x)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(static_out, model(new_x), rtol=1e-4, atol=1e-4)


def test_patched_hf_perceiver_on_gpu():
    transformers = pytest.importorskip("transformers")
    from perceiver_fast.integrations import patch_hf_perceiver

    cfg = transformers.PerceiverConfig(num_latents=8, d_latents=32, num_blocks=2, num_self_attends_per_block=2,
                                       num_self_attention_heads=4, num_cross_attention_heads=1, image_size=16,
                                       num_labels=5, attention_probs_dropout_prob=0.0)
    hf = transformers.PerceiverForImageClassificationFourier(cfg).cuda().eval()
    patched = patch_hf_perceiver(copy.deepcopy(hf))
    x = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(patched(inputs=x).logits, hf(inputs=x).logits, rtol=1e-3, atol=1e-3)
