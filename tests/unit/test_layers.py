"""Expert layers: the DESIGN §1 contract, paper equations, stacked vs loop reference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modula_ray.errors import ConfigError
from modula_ray.experts import METHODS, reference_forward, wrap_linear
from tests.helpers import assert_same_gradients

D_IN, D_OUT, N = 12, 10, 3
ROUTED = {"lora": 0, "molora": N, "modula_flan": N + 1, "modula_res": N}
STAGES_OF = {"lora": ["universal", "joint"], "molora": ["experts", "router", "joint"],
             "modula_flan": ["universal", "experts", "router", "joint"],
             "modula_res": ["universal", "experts", "router", "joint"]}


def make_layer(method, n=N, seed=0, **kw):
    torch.manual_seed(seed)
    layer = wrap_linear(nn.Linear(D_IN, D_OUT), method, n, **kw)
    with torch.no_grad():  # random everything, so no term hides behind a zero init
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.normal_(0, 0.3)
    return layer


def test_four_methods_registered():
    assert set(METHODS) >= {"lora", "molora", "modula_flan", "modula_res"}


@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
def test_parameter_names_and_shapes(method):
    layer = wrap_linear(nn.Linear(D_IN, D_OUT), method, N, universal_rank=6, domain_rank=4)
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    expected = {"base.weight": (D_OUT, D_IN), "base.bias": (D_OUT,)}
    if method != "molora":
        expected |= {"universal.A": (6, D_IN), "universal.B": (D_OUT, 6)}
    if method != "lora":
        reads = D_OUT if method == "modula_res" else D_IN
        expected |= {"domain.A": (N, 4, reads), "domain.B": (N, D_OUT, 4),
                     "router.weight": (ROUTED[method], D_IN)}
    assert shapes == expected


@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
def test_fresh_layer_is_the_base_layer(method):
    base = nn.Linear(D_IN, D_OUT)
    layer = wrap_linear(base, method, N)
    x = torch.randn(4, 7, D_IN)
    assert torch.equal(layer(x), base(x))
    if layer.router is not None:
        assert torch.count_nonzero(layer.router.weight) == 0
    assert torch.count_nonzero((layer.universal or layer.domain).B) == 0


def _gates(x, w, b=None, tau=1.0, k=None):
    """Paper router, per token: softmax(W_R x / tau), top-k kept and renormalised."""
    logits = (w @ x + (b if b is not None else 0)) / tau
    g = torch.softmax(logits, dim=0)
    if k is not None:
        keep = torch.zeros_like(g)
        keep[torch.topk(logits, k).indices] = 1
        g = g * keep / (g * keep).sum()
    return g


def paper_equation(layer, x_vec, *, tau=1.0, k=None):
    """MoLoRA eq. 1-3, Flan eq. 5-8, Res eq. 9-12 for ONE token vector, from named parameters only."""
    P = dict(layer.named_parameters())
    s = layer.settings
    su, sd = s.universal_alpha / s.universal_rank, s.domain_alpha / s.domain_rank
    y = P["base.weight"] @ x_vec + P["base.bias"]
    if layer.method == "lora":
        return y + su * P["universal.B"] @ (P["universal.A"] @ x_vec)
    g = _gates(x_vec, P["router.weight"], None, tau, k)
    n = P["domain.A"].shape[0]
    if layer.method == "molora":  # y = W0 x + sum_i g_i s B_i A_i x
        return y + sum(g[i] * sd * P["domain.B"][i] @ (P["domain.A"][i] @ x_vec) for i in range(n))
    if layer.method == "modula_flan":  # universal is routed expert 0
        y = y + g[0] * su * P["universal.B"] @ (P["universal.A"] @ x_vec)
        return y + sum(g[i + 1] * sd * P["domain.B"][i] @ (P["domain.A"][i] @ x_vec) for i in range(n))
    h = su * P["universal.B"] @ (P["universal.A"] @ x_vec)  # res: h = s* B* A* x
    refine = sum(g[i] * sd * P["domain.B"][i] @ F.leaky_relu(P["domain.A"][i] @ h, 0.01) for i in range(n))
    return y + h + refine


@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_matches_paper_equations_per_token(method, top_k):
    top_k = None if method == "lora" else top_k
    layer = make_layer(method, top_k=top_k, temperature=0.7 if method != "lora" else 1.0)
    x = torch.randn(2, 3, D_IN)
    y = layer(x)
    for b in range(2):
        for t in range(3):
            expected = paper_equation(layer, x[b, t], tau=layer.settings.temperature, k=top_k)
            torch.testing.assert_close(y[b, t], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_stacked_equals_loop_reference_outputs_and_gradients(method, top_k):
    top_k = None if method == "lora" else top_k
    for stage in STAGES_OF[method]:
        kw = dict(top_k=top_k, temperature=1.5, router_bias=method != "lora") if method != "lora" else {}
        n = 1 if stage == "experts" else N
        kw = kw | ({"top_k": None} if n == 1 and "top_k" in kw else {})
        fast, slow = make_layer(method, n, seed=1, **kw), make_layer(method, n, seed=1, **kw)
        fast.set_stage(stage)
        slow.set_stage(stage)
        x = torch.randn(3, 5, D_IN)
        x_fast, x_slow = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_fast, y_slow = fast(x_fast), reference_forward(slow, x_slow)
        torch.testing.assert_close(y_fast, y_slow, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # delta, the experts' part alone, is the same maths
            torch.testing.assert_close(fast.base(x) + fast.delta(x), y_slow, rtol=1e-5, atol=1e-5)
        weights = torch.randn_like(y_fast)
        (y_fast * weights).sum().backward()
        (y_slow * weights).sum().backward()
        torch.testing.assert_close(x_fast.grad, x_slow.grad, rtol=1e-5, atol=1e-5)
        assert assert_same_gradients(fast.named_parameters(), slow.named_parameters()) > 0, stage


@pytest.mark.parametrize("method", ["molora", "modula_flan", "modula_res"])
def test_experts_stage_single_expert_forward(method):
    layer = make_layer(method, n=1)
    layer.set_stage("experts")
    x = torch.randn(4, D_IN)
    P = dict(layer.named_parameters())
    su, sd = 32 / 16, 16 / 8
    y0 = x @ P["base.weight"].T + P["base.bias"]
    if method == "modula_res":  # W0 x + h + s B_1 LeakyReLU(A_1 h), universal frozen but active
        h = su * x @ P["universal.A"].T @ P["universal.B"].T
        expected = y0 + h + sd * F.leaky_relu(h @ P["domain.A"][0].T, 0.01) @ P["domain.B"][0].T
    else:  # paper eq. 4: W0 x + s B_1 A_1 x, universal inactive
        expected = y0 + sd * x @ P["domain.A"][0].T @ P["domain.B"][0].T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_router_top_k_renormalises_and_temperature_sharpens():
    layer = make_layer("molora", n=4, top_k=2)
    gates = layer.router(torch.randn(50, D_IN))
    assert torch.allclose(gates.sum(-1), torch.ones(50))
    assert ((gates > 0).sum(-1) == 2).all()
    hot = make_layer("molora", n=4, temperature=0.1).router(torch.ones(1, D_IN))
    cold = make_layer("molora", n=4, temperature=10.0).router(torch.ones(1, D_IN))
    assert hot.max() > cold.max()


def test_switch_load_balancing_loss_values():
    layer = wrap_linear(nn.Linear(D_IN, D_OUT), "molora", 2)
    x = torch.randn(64, D_IN)
    layer(x)  # zero router: uniform probabilities -> the balanced optimum, exactly 1
    assert layer.router.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias = nn.Parameter(torch.tensor([20.0, -20.0]))
    layer(x)  # everything to expert 0 with P_0 ~ 1 -> n * 1 * 1 = 2
    assert layer.router.aux_loss.item() == pytest.approx(2.0, abs=1e-4)
    assert layer.router.mean_gates.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert layer.router.aux_loss.requires_grad


def test_experts_are_computed_without_a_python_loop():
    """One batched matmul per projection: wall time must not grow like n (checked by op count)."""
    layer = make_layer("modula_res", n=8)
    x = torch.randn(2, 4, D_IN)
    with torch.profiler.profile() as prof:
        layer(x)
    matmuls = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::matmul"))
    small = make_layer("modula_res", n=1)
    with torch.profiler.profile() as prof1:
        small(x)
    matmuls_1 = sum(e.count for e in prof1.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::matmul"))
    assert matmuls == matmuls_1


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="nope"), "method"), (dict(n_domains=0), "n_domains"), (dict(domain_rank=0), "domain_rank"),
    (dict(universal_rank=-1), "universal_rank"), (dict(top_k=5), "top_k"), (dict(temperature=0.0), "temperature"),
    (dict(dropout=1.0), "dropout"),
    # a rank over the weight's smaller side (a manifest's, say): refused before anything is allocated
    (dict(universal_rank=10 ** 9), "universal_rank"), (dict(universal_rank=4, domain_rank=10 ** 9), "domain_rank"),
])
def test_bad_arguments_raise_value_error_naming_the_field(kwargs, field):
    args = dict(method="modula_res", n_domains=3) | kwargs
    with pytest.raises(ValueError, match=field) as info:
        wrap_linear(nn.Linear(D_IN, D_OUT), args.pop("method"), args.pop("n_domains"), **args)
    if field not in ("method", "n_domains"):  # a setting: the method's config class names it
        assert isinstance(info.value, ConfigError) and info.value.field == field


def test_flan_top_k_counts_the_universal_expert():
    wrap_linear(nn.Linear(D_IN, D_OUT), "modula_flan", 3, top_k=4)  # 4 routed: fine
    with pytest.raises(ValueError, match="top_k"):
        wrap_linear(nn.Linear(D_IN, D_OUT), "modula_flan", 3, top_k=5)


def test_set_stage_experts_needs_one_domain():
    layer = make_layer("modula_flan", n=2)
    with pytest.raises(ValueError, match="exactly one domain expert"):
        layer.set_stage("experts")
    with pytest.raises(ValueError, match="stage"):
        make_layer("molora").set_stage("universal")


@pytest.mark.parametrize("method", ["modula_flan", "modula_res"])
def test_dropout_path_follows_the_equations_with_the_same_masks(method):
    """With dropout on, A* and the A_i read dropped-out inputs (res: dropout(h), so h is formed);
    the router reads x. Same seed, same masks: the equations written out give the same y."""
    layer = make_layer(method, dropout=0.5).train()
    layer.set_stage("joint")
    x = torch.randn(2, 5, D_IN)
    torch.manual_seed(7)
    y = layer(x)
    P = dict(layer.named_parameters())
    su, sd = 32 / 16, 16 / 8
    g = torch.softmax(x @ P["router.weight"].T + P["router.bias"], -1) if "router.bias" in P else \
        torch.softmax(x @ P["router.weight"].T, -1)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, training=True)
    expected = x @ P["base.weight"].T + P["base.bias"]
    if method == "modula_res":
        h = su * xd @ P["universal.A"].T @ P["universal.B"].T
        hd = F.dropout(h, 0.5, training=True)
        expected = expected + h
        for i in range(N):
            expected = expected + g[..., i:i + 1] * sd * F.leaky_relu(hd @ P["domain.A"][i].T, 0.01) @ P["domain.B"][i].T
    else:
        expected = expected + g[..., :1] * su * xd @ P["universal.A"].T @ P["universal.B"].T
        for i in range(N):
            expected = expected + g[..., i + 1:i + 2] * sd * xd @ P["domain.A"][i].T @ P["domain.B"][i].T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # dropout off: the fused path, equal to the per-expert loop
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "molora", "modula_flan", "modula_res"])
def test_torch_compile_equals_eager_outputs_and_gradients(method):
    """``stages.<stage>.compile: true`` runs the same maths: compiled output and gradients equal eager's."""
    eager, fast = make_layer(method, seed=3), make_layer(method, seed=3)
    compiled = torch.compile(fast)
    x = torch.randn(2, 6, D_IN)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_compiled = eager(x_eager), compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(y_eager)
    (y_eager * weights).sum().backward()
    (y_compiled * weights).sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    assert assert_same_gradients(fast.named_parameters(), eager.named_parameters()) > 0
    with torch.no_grad():  # an optimizer step: the next training step reuses the compiled graph
        for p in fast.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x_compiled).sum().backward()


@pytest.mark.parametrize("method", ["molora", "modula_flan", "modula_res"])
def test_weights_joined_without_autograd_follow_every_parameter_change(method):
    """Serving keeps the joined weights between forwards; an update, a load or a stage change is seen."""
    layer = make_layer(method).eval()
    x = torch.randn(2, 3, D_IN)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # from the kept weights
        for name in ("domain.B", "domain.A", "router.weight"):
            dict(layer.named_parameters())[name].add_(0.5)  # in place, as AdamW and load_state_dict do
            torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
        if method == "modula_res":
            layer.universal.B.mul_(2.0)
            torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
        if method != "molora":  # another stage joins other weights
            layer.set_stage("universal")
        torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer(x), first)
