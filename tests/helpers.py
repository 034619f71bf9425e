"""Helpers shared by tests."""
import torch


def randomise_experts(model, seed=0, scale=0.05):
    """Give every expert and router parameter random values, so no term hides behind zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in (".universal.", ".domain.", ".router.")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ids(tokenizer, text="the patient takes 12 + 7 = 19 doses"):
    return tokenizer(text, return_tensors="pt").input_ids


def assert_same_gradients(fast, slow, rtol=1e-5, atol=1e-5) -> int:
    """Pairs of ``(name, parameter)`` from a fast path and its reference got the same gradients (or
    none on both sides); returns how many had one."""
    checked = 0
    for (name, p_fast), (_, p_slow) in zip(fast, slow):
        assert (p_fast.grad is None) == (p_slow.grad is None), name
        if p_fast.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_slow.grad, rtol=rtol, atol=atol, msg=name)
            checked += 1
    return checked
