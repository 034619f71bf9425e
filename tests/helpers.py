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
